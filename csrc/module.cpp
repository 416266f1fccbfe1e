// The Python module vpns_fast._C: binds every op declared in vpns_ops.h. setup.py compiles all of
// csrc/*.cpp into this one extension, so a new op adds its declaration there and its binding here.
#include "vpns_ops.h"

#include <torch/extension.h>

namespace vpns {
// csrc/object_checks.cpp
void bind_object_checks(py::module_& m);
}  // namespace vpns

// A CheckedSegments' last entry (the nonzeros it ends at; never empty).
int64_t last_segment(const vpns::CheckedSegments& self) {
  return self.segments.const_data_ptr<int64_t>()[self.segments.numel() - 1];
}

// sparse_conv2d for one type of `segments` (a tensor, checked in full at every call, or a CheckedSegments) and of
// `offsets` (a tensor, read in full at every call, or a CheckedOffsets).
template <typename Segments, typename Offsets>
void bind_sparse_conv2d(py::module_& m, const char* doc) {
  m.def("sparse_conv2d",
        py::overload_cast<const at::Tensor&, const Segments&, const Offsets&, const at::Tensor&,
                          const std::vector<int64_t>&, const std::optional<at::Tensor>&, const std::vector<int64_t>&,
                          const std::vector<int64_t>&, const std::vector<int64_t>&, const std::optional<at::Tensor>&,
                          int64_t, int64_t, bool, bool>(&vpns::sparse_conv2d),
        py::arg("input"), py::arg("segments"), py::arg("offsets"), py::arg("values"), py::arg("weight_shape"),
        py::arg("bias"), py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("residual") = py::none(),
        py::arg("activation") = 0, py::arg("input_channel_stride") = 0, py::arg("aligned_output") = false,
        py::arg("residual_reusable") = false,
        // no Python object is touched inside: other Python threads run meanwhile (one deployed model
        // called from several threads)
        py::call_guard<py::gil_scoped_release>(), doc);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vpns_fast C++ CPU kernels";
  py::register_exception<vpns::ShapeChanged>(m, "ShapeChanged", PyExc_RuntimeError);
  vpns::bind_object_checks(m);
  m.def(
      "input_stage", &vpns::input_stage, py::arg("images"), py::arg("mean"), py::arg("std"), py::arg("height"),
      py::arg("width"), py::call_guard<py::gil_scoped_release>(),
      "(normalized, low, high) where a deployed model's one-pass input stage takes the images: not traced, a strided\n"
      "(not nested) CPU tensor [N, 3, height, width] (height 0: any size), uint8 or float32, no gradient;\n"
      "normalized bit for bit as vpns_fast.nn.prompts.normalize, low and high the pixels' extremes on the [0, 1]\n"
      "scale (NaN for both where one is NaN; 0 and 1 for uint8 and an empty batch). Else None, never an error:\n"
      "the caller's general path checks those images. The range is the caller's to check.");
  m.def("topk_threshold", &vpns::topk_threshold, py::arg("tensors"), py::arg("k"), py::arg("hint") = py::none(),
        R"doc(k-th smallest |s| over all elements of `tensors` together (k is 1-based, 1 <= k <= N).

Equal bit for bit to torch.kthvalue(torch.cat([t.abs().flatten() for t in tensors]), k).values,
returned as a 0-dim tensor of the tensors' dtype, without concatenating them. Tensors must be
CPU, one dtype among float32/float64/float16/bfloat16; strided ones are read through a copy.
NaN sorts above +inf (as torch.kthvalue on the CPU), so a k that reaches the NaNs gives NaN.

hint: optional previous threshold (a float). When the answer lies within 2^-9 (0.195%) of it,
float32 finishes in one pass instead of two. Any hint (wrong, negative, inf, NaN) still gives
the exact answer; float16/bfloat16 ignore it.)doc");

  m.def("sparse_conv2d_pack", &vpns::sparse_conv2d_pack, py::arg("weight"),
        R"doc(Packs a dense float32 conv weight [C_out, C_in, KH, KW] for sparse_conv2d.

Returns [row_ptr (int64, C_out + 1), channel_index (int32, nnz), tap_index (int32, nnz: kh * KW + kw),
values (float32, nnz)]: for each output channel, its nonzero weights in (c_in, kh, kw) order.
Exact zeros are skipped (NaN and inf are kept).)doc");
  m.def("sparse_conv2d_offsets", &vpns::sparse_conv2d_offsets, py::arg("row_ptr"), py::arg("channel_index"),
        py::arg("tap_index"), py::arg("values"), py::arg("weight_shape"), py::arg("input_size"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("channel_block") = 0, py::arg("input_channel_stride") = 0,
        R"doc(The input-size-dependent part of a packed weight, for inputs of spatial size input_size = (H, W):
[offsets (int32, nnz): where each nonzero reads the padded input planes,
 segments (int64, C_out * blocks + 1): the nonzeros split by input-channel block, block-major (block j's
   output channels one after another: channel o's run is segments[j * C_out + o] .. [j * C_out + o + 1]),
 values (float32, nnz): the packed values in that order].

Callers compute them once per input size and pass all three to sparse_conv2d. channel_block: input channels
per block (0 = chosen so that a block's input tile fits in L1). input_channel_stride: floats from one input
channel to the next in the inputs these offsets are for (0 = H * W, contiguous); a 1x1, stride-1, unpadded conv
reads its input in place, so its offsets depend on it; pass sparse_conv2d the same value.)doc");
  m.def("sparse_conv2d_lanes_supported", &vpns::sparse_conv2d_lanes_supported, py::arg("weight_shape"),
        py::arg("input_size"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        "Whether sparse_conv2d_lanes takes this geometry: a 3x3 kernel, padding 1, dilation 1, stride 1 or 2, a 7x7 "
        "or 14x14 output.");
  m.def("sparse_conv2d_lanes_pack", &vpns::sparse_conv2d_lanes_pack, py::arg("row_ptr"), py::arg("channel_index"),
        py::arg("tap_index"), py::arg("values"), py::arg("weight_shape"), py::arg("input_size"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"),
        "[offsets, segments, values] of sparse_conv2d_pack's nonzeros for sparse_conv2d_lanes at input_size (H, W) "
        "(segments ends with the geometry they were packed for: C_in, H, W, stride): "
        "blocks of 16 input channels, block-major as sparse_conv2d_offsets lays them out.");
  m.def("sparse_conv2d_lanes", &vpns::sparse_conv2d_lanes, py::arg("input"), py::arg("segments"), py::arg("offsets"),
        py::arg("values"), py::arg("weight_shape"), py::arg("bias"), py::arg("stride"), py::arg("padding"),
        py::arg("dilation"), py::arg("activation") = 0, py::arg("aligned_output") = false,
        "sparse_conv2d for a batch that is a multiple of 16 (offsets: sparse_conv2d_lanes_pack's, through "
        "check_offsets), the images in the AVX-512 vector lanes (csrc/"
        "batch_lanes.cpp): the same outputs bit for bit, a 3x3 kernel with padding 1 only (sparse_conv2d_lanes_"
        "supported), no residual, activation 0 (none) or 1 (relu); needs the AVX-512 kernel.");
  py::class_<vpns::GeneratedPointwise, std::shared_ptr<vpns::GeneratedPointwise>>(
      m, "GeneratedPointwise",
      "Machine code written for one sparse 1x1 layer's nonzeros at one input size (sparse_pointwise_generate).")
      .def_readonly("mapped_bytes", &vpns::GeneratedPointwise::size,
                    "Bytes of executable memory the code holds (whole pages).");
  m.def("sparse_pointwise_generated_supported", &vpns::sparse_pointwise_generated_supported, py::arg("weight_shape"),
        py::arg("input_size"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        "Whether sparse_pointwise_generated takes this geometry: x86-64 Linux, a 1x1 kernel, stride 1, no padding, "
        "at most 4096 positions and C_in * H * W <= 2^24.");
  m.def("sparse_pointwise_generate", &vpns::sparse_pointwise_generate, py::arg("row_ptr"), py::arg("channel_index"),
        py::arg("values"), py::arg("weight_shape"), py::arg("input_size"),
        "(code, table): machine code for sparse_conv2d_pack's nonzeros of a 1x1 layer at input_size (H, W), written "
        "into executable memory, and its weights in the order it reads them (csrc/generated_conv.cpp). RuntimeError "
        "where the system refuses executable memory.");
  m.def("sparse_pointwise_generated", &vpns::sparse_pointwise_generated, py::arg("input"), py::arg("code"),
        py::arg("table"), py::arg("bias"), py::arg("residual") = py::none(), py::arg("activation") = 0,
        py::arg("aligned_output") = false,
        "sparse_conv2d of a 1x1, stride-1, unpadded layer for a batch that is a multiple of 16 through the code of "
        "sparse_pointwise_generate (its table): the same outputs bit for bit; residual, activation 0 (none) or 1 "
        "(relu) and aligned_output as sparse_conv2d takes them; needs AVX-512.");
  bind_sparse_conv2d<at::Tensor, at::Tensor>(m, R"doc(Direct sparse 2-d convolution (groups = 1, zero padding), equal to
F.conv2d(input, weight, bias, stride, padding, dilation) within float32 rounding; with the fused
epilogue, to act(F.conv2d(...) + residual) (residual: float32, the output's shape, or None; activation: 0 none,
1 relu, 2 silu, 3 relu6, 4 hardswish, 5 sigmoid, 6 hardsigmoid, each as torch computes it).

input: float32 CPU [N, C_in, H, W]; segments, offsets and values from sparse_conv2d_offsets(..., input_size=(H, W),
same stride/padding/dilation) (values in its order, not the pack function's); offsets may also be
check_offsets(offsets), whose range is checked against the input without reading them all at every call (a plain
tensor is read in full at every call: no offset may point outside the input); bias: float32 [C_out] or None.
input_channel_stride: 0 (the input is read as a contiguous tensor, copied if it is not one), or S >= H * W for an
input with strides (C_in * S, S, W, 1), read as it is (the offsets made with the same value). aligned_output: the
output's channels start a whole number of 64-byte lines apart (strides (C_out * P, P, W_out, 1), P = H_out * W_out
rounded up to a multiple of 16 when it is above 8; the floats between channels are zeros), so that a 1x1 conv
reading it in place loads aligned vectors; False: a contiguous output. A residual with strides (C_out * R, R, W_out,
1) is read as it is. residual_reusable: nothing reads the residual after this call, so the output may be written
into it and the residual returned (where the output has set_in_place_residual_bytes' bytes or more, is not streamed,
the residual has the output's strides, its storage holds its last channel's padding too and none of that memory lies
within the input's span; an aligned residual's floats between channels are then zeroed). Never materialises im2col: each output channel's nonzeros multiply shifted rows of the
padded input.)doc");
  py::class_<vpns::CheckedOffsets, std::shared_ptr<vpns::CheckedOffsets>>(
      m, "CheckedOffsets",
      "Offsets for sparse_conv2d, copied and their range found once (from check_offsets); their copy cannot be "
      "reached or changed from Python.")
      .def_property_readonly("numel", [](const vpns::CheckedOffsets& self) { return self.offsets.numel(); })
      .def("__repr__", [](const vpns::CheckedOffsets& self) {
        return "CheckedOffsets(numel=" + std::to_string(self.offsets.numel()) + ", min=" + std::to_string(self.lo) +
               ", max=" + std::to_string(self.hi) + ")";
      });
  m.def(
      "check_offsets", [](const at::Tensor& offsets) { return std::make_shared<vpns::CheckedOffsets>(offsets); },
      py::arg("offsets"),
      R"doc(A private copy of `offsets` (int32, from sparse_conv2d_offsets) with its smallest and largest value,
for sparse_conv2d's `offsets` argument: the call then checks the range against its input instead of reading every
offset. Later changes to `offsets` do not reach the copy.)doc");
  bind_sparse_conv2d<at::Tensor, vpns::CheckedOffsets>(m, "sparse_conv2d with offsets from check_offsets (see above).");
  py::class_<vpns::CheckedSegments, std::shared_ptr<vpns::CheckedSegments>>(
      m, "CheckedSegments",
      "Segments for sparse_conv2d, copied and found to start at 0 and never decrease once (from check_segments); "
      "their copy cannot be reached or changed from Python.")
      .def_property_readonly("numel", [](const vpns::CheckedSegments& self) { return self.segments.numel(); })
      .def_property_readonly("last", &last_segment)
      .def("__repr__", [](const vpns::CheckedSegments& self) {
        return "CheckedSegments(numel=" + std::to_string(self.segments.numel()) +
               ", last=" + std::to_string(last_segment(self)) + ")";
      });
  m.def(
      "check_segments", [](const at::Tensor& segments) { return std::make_shared<vpns::CheckedSegments>(segments); },
      py::arg("segments"),
      R"doc(A private copy of `segments` (int64, from sparse_conv2d_offsets), checked once to start at 0 and never
decrease, for sparse_conv2d's `segments` argument (with offsets from check_offsets) and CallPlan.add_sparse_conv: each
call then checks only their count and last entry against the values instead of reading every entry. Later changes to
`segments` do not reach the copy.)doc");
  bind_sparse_conv2d<vpns::CheckedSegments, vpns::CheckedOffsets>(
      m, "sparse_conv2d with segments from check_segments and offsets from check_offsets (see above).");
  m.def("pointwise_conv_supported", &vpns::pointwise_conv_supported,
        "Whether pointwise_conv can run here (a CPU with AVX2 and FMA).");
  m.def("pointwise_conv_pack", &vpns::pointwise_conv_pack, py::arg("weight"),
        R"doc(Packs a dense float32 1x1 conv weight [C_out, C_in, 1, 1] (C_out a multiple of 16) for pointwise_conv:
[C_out / 16, C_in, 16], panels of 16 output channels.)doc");
  m.def("pointwise_conv", &vpns::pointwise_conv, py::arg("input"), py::arg("packed"), py::arg("bias") = py::none(),
        py::arg("residual") = py::none(), py::arg("relu") = false, py::arg("into_residual") = false,
        py::call_guard<py::gil_scoped_release>(),
        R"doc(Dense 1x1, stride-1, unpadded convolution of a channels_last float32 input [N, C_in, H, W]: equal to
act(F.conv2d(input, weight, bias) + residual) within float32 rounding (act: ReLU when relu, NaN kept; residual of the
output's shape or None), the output channels_last: a new tensor, or the residual itself, written in place, with
into_residual (a channels_last residual). packed from pointwise_conv_pack; needs AVX2 and FMA.)doc");
  m.def("dense_linear", &vpns::dense_linear, py::arg("input"), py::arg("weight"), py::arg("bias") = py::none(),
        py::call_guard<py::gil_scoped_release>(),
        R"doc(Dense linear layer for a 2-d float32 input [rows, in_features] of a few rows: equal to F.linear(input,
weight, bias) within float32 rounding, each thread reading its share of the weight's rows once for every input row
(for the engine's layers kept dense at small batch); needs AVX2 and FMA.)doc");
  m.def("sparse_linear_pack", &vpns::sparse_linear_pack, py::arg("weight"),
        R"doc(Packs a dense float32 weight [out_features, in_features] as CSR:
[row_ptr (int64, out_features + 1), column_index (int32, nnz), values (float32, nnz)]; exact zeros skipped.)doc");
  m.def("sparse_linear", &vpns::sparse_linear, py::arg("input"), py::arg("row_ptr"), py::arg("column_index"),
        py::arg("values"), py::arg("in_features"), py::arg("bias"), py::call_guard<py::gil_scoped_release>(),
        R"doc(Sparse (CSR) weight times dense input: equal to F.linear(input, weight, bias) within float32 rounding.

input: float32 CPU [..., in_features]; bias: float32 [out_features] or None.)doc");
  m.def("max_pool2d", &vpns::max_pool2d, py::arg("input"), py::arg("kernel_size"), py::arg("stride"),
        py::arg("padding"), py::call_guard<py::gil_scoped_release>(),
        R"doc(Max pooling of a float32 CPU [N, C, H, W] input (dilation 1, floor mode, padding <= kernel / 2):
equal to F.max_pool2d(input, kernel_size, stride, padding), NaN propagating.)doc");
  m.def("global_avg_pool2d", &vpns::global_avg_pool2d, py::arg("input"), py::call_guard<py::gil_scoped_release>(),
        R"doc(Each channel's mean over its plane of a float32 CPU [N, C, H, W] input, contiguous or channels_last:
[N, C, 1, 1], within float32 rounding of input.mean((2, 3), keepdim=True) (the same bits on any thread count).)doc");
  m.def("winograd_conv2d", &vpns::winograd_conv2d, py::arg("input"), py::arg("weight"), py::arg("bias"),
        py::arg("padding"), py::arg("residual") = py::none(), py::arg("activation") = 0, py::arg("chunk_tiles") = 0,
        py::call_guard<py::gil_scoped_release>(),
        R"doc(Dense 3x3 convolution, stride 1, dilation 1, groups 1, zero padding, by Winograd's F(4x4, 3x3):
act(F.conv2d(input, w, bias, padding=padding) + residual) within float32 rounding (about 5e-6 of the output's
largest magnitude), as a channels_last tensor.

input: float32 CPU [N, C_in, H, W] (channels_last is read in place, anything else copied); weight: the
[36, C_in, C_out] float32 transform of w made by vpns_fast.deploy.winograd.winograd_weight (products by torch's
batched sgemm) or the same in packed panels, [36, C_out / 16, C_in, 16] from winograd_panels (products by the
engine's 1x1 tile; needs pointwise_conv_supported()); bias: float32
[C_out] or None; residual: float32 of the output's shape, or None; activation: 0 none, 1 relu (NaN kept);
chunk_tiles: 4x4 output tiles transformed at once (0: about 2 MiB of transformed data).)doc");
  m.def(
      "activation_buffer",
      [](std::vector<int64_t> sizes, bool channels_last) {
        TORCH_CHECK(!channels_last || sizes.size() == 4, "activation_buffer: channels_last needs 4 sizes, got ",
                    sizes.size());
        return vpns::empty_activation(sizes,
                                      channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
      },
      py::arg("sizes"), py::arg("channels_last") = false,
      "An uninitialised float32 CPU tensor of these sizes (contiguous, or channels_last strides) whose storage comes\n"
      "from the engine's cache of already touched buffers (64 KiB and more; smaller ones from torch's allocator); it\n"
      "goes back to the cache when freed.");
  py::class_<vpns::CallPlan, std::shared_ptr<vpns::CallPlan>>(
      m, "CallPlan",
      "A converted network's calls for one input shape, run as one call (vpns_fast.deploy.call_plan builds it; "
      "see csrc/vpns_ops.h for each method).")
      .def(py::init<int64_t, int64_t>(), py::arg("slots"), py::arg("output_slot"))
      .def("watch", &vpns::CallPlan::watch, py::arg("tensor"))
      .def("release_after_last_step", &vpns::CallPlan::release_after_last_step, py::arg("slots"))
      .def("add_sparse_conv", &vpns::CallPlan::add_sparse_conv, py::arg("input"), py::arg("residual"),
           py::arg("output"), py::arg("segments"), py::arg("offsets"), py::arg("values"), py::arg("weight_shape"),
           py::arg("bias"), py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("activation"),
           py::arg("input_channel_stride"), py::arg("aligned_output"), py::arg("residual_reusable") = false)
      .def("add_sparse_pointwise_generated", &vpns::CallPlan::add_sparse_pointwise_generated, py::arg("input"),
           py::arg("residual"), py::arg("output"), py::arg("code"), py::arg("table"), py::arg("bias"),
           py::arg("activation"), py::arg("aligned_output"))
      .def("add_sparse_conv_lanes", &vpns::CallPlan::add_sparse_conv_lanes, py::arg("input"), py::arg("output"),
           py::arg("segments"), py::arg("offsets"), py::arg("values"), py::arg("weight_shape"), py::arg("bias"),
           py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("activation"), py::arg("aligned_output"))
      .def("add_pointwise_conv", &vpns::CallPlan::add_pointwise_conv, py::arg("input"), py::arg("residual"),
           py::arg("output"), py::arg("packed"), py::arg("bias"), py::arg("relu"), py::arg("into_residual"))
      .def("add_onednn_conv", &vpns::CallPlan::add_onednn_conv, py::arg("input"), py::arg("residual"),
           py::arg("output"), py::arg("packed"), py::arg("bias"), py::arg("padding"), py::arg("stride"),
           py::arg("dilation"), py::arg("groups"), py::arg("into_residual"), py::arg("activation"))
      .def("add_winograd_conv", &vpns::CallPlan::add_winograd_conv, py::arg("input"), py::arg("residual"),
           py::arg("output"), py::arg("weight"), py::arg("bias"), py::arg("padding"), py::arg("activation"))
      .def("add_expect_sizes", &vpns::CallPlan::add_expect_sizes, py::arg("input"), py::arg("sizes"),
           py::arg("strides") = std::vector<int64_t>())
      .def("add_channels_last_copy", &vpns::CallPlan::add_channels_last_copy, py::arg("input"), py::arg("output"))
      .def("add_contiguous", &vpns::CallPlan::add_contiguous, py::arg("input"), py::arg("output"))
      .def("add_max_pool", &vpns::CallPlan::add_max_pool, py::arg("input"), py::arg("output"), py::arg("kernel_size"),
           py::arg("stride"), py::arg("padding"))
      .def("add_adaptive_avg_pool", &vpns::CallPlan::add_adaptive_avg_pool, py::arg("input"), py::arg("output"),
           py::arg("output_size"))
      .def("add_global_avg_pool", &vpns::CallPlan::add_global_avg_pool, py::arg("input"), py::arg("output"))
      .def("add_flatten", &vpns::CallPlan::add_flatten, py::arg("input"), py::arg("output"), py::arg("start_dim"),
           py::arg("end_dim"))
      .def("add_dense_linear", &vpns::CallPlan::add_dense_linear, py::arg("input"), py::arg("output"),
           py::arg("weight"), py::arg("bias"))
      .def("add_sparse_linear", &vpns::CallPlan::add_sparse_linear, py::arg("input"), py::arg("output"),
           py::arg("row_ptr"), py::arg("column_index"), py::arg("values"), py::arg("in_features"), py::arg("bias"))
      .def(
          "add_python_call",
          [](vpns::CallPlan& self, const std::string& name, std::vector<int64_t> inputs, std::vector<int64_t> outputs,
             py::object function) {
            for (const int64_t slot : inputs) self.check_slots({slot});
            TORCH_CHECK(!outputs.empty(), "CallPlan.add_python_call: no output slot");
            for (const int64_t slot : outputs) self.check_slots({slot});
            // A weak reference: whoever builds the plan keeps the callable (vpns_fast.deploy.call_plan's NetworkPlan
            // does), where the cycle collector sees it; a strong one here would hide a cycle through the plan (a
            // layer holding the module that holds the plan) from it. Dropped with the GIL held, whichever thread
            // drops the plan's last reference.
            auto held = std::shared_ptr<py::weakref>(new py::weakref(function), [](py::weakref* reference) {
              py::gil_scoped_acquire gil;
              delete reference;
            });
            self.add("python:" + name, [inputs, outputs, held, name](std::vector<at::Tensor>& slot) {
              py::gil_scoped_acquire gil;
              const py::object callable = (*held)();
              if (callable.is_none()) {
                throw std::runtime_error("CallPlan: the Python step " + name +
                                         "'s callable is gone (its owner dropped it)");
              }
              py::tuple args(inputs.size());
              for (size_t i = 0; i < inputs.size(); ++i) args[i] = py::cast(slot[inputs[i]]);
              const py::object result = callable(*args);
              if (outputs.size() == 1) {
                slot[outputs[0]] = result.cast<at::Tensor>();
                return;
              }
              const auto tensors = result.cast<std::vector<at::Tensor>>();
              TORCH_CHECK(tensors.size() == outputs.size(), "CallPlan: a Python step gave ", tensors.size(),
                          " tensors for ", outputs.size(), " slots");
              for (size_t i = 0; i < outputs.size(); ++i) slot[outputs[i]] = tensors[i];
            });
          },
          py::arg("name"), py::arg("inputs"), py::arg("outputs"), py::arg("function"),
          "A step that calls function(*the tensors in inputs) in Python (the GIL taken for it) and keeps its "
          "tensor in the one output slot, or the tensors of the sequence it returns in the output slots: a graph "
          "node the plan has no C++ step for. The plan holds function weakly: the caller keeps it alive.")
      // the GIL is released while it runs (taken again only by Python steps): other Python threads run meanwhile
      .def("run", &vpns::CallPlan::run, py::arg("input"), py::call_guard<py::gil_scoped_release>(),
           "The network's output for input, or None when a watched tensor changed in place since the plan was made.")
      .def("run_timed", &vpns::CallPlan::run_timed, py::arg("input"), py::call_guard<py::gil_scoped_release>(),
           "(run(input), the seconds each step took, in step_names' order; empty when the plan is stale).")
      .def_property_readonly("steps", &vpns::CallPlan::steps)
      .def_property_readonly("step_names", &vpns::CallPlan::step_names);
  m.def("aligned_channel_stride", &vpns::aligned_channel_stride, py::arg("plane"),
        "Floats from one channel to the next in sparse_conv2d's aligned_output for planes of `plane` floats: the\n"
        "plane rounded up to whole 64-byte lines (16 floats) when it is above 8 floats, else the plane.");
  m.def("cached_activation_bytes", &vpns::cached_activation_bytes,
        "Bytes of idle activation buffers the engine keeps for reuse (buffers of 64 KiB and more).");
  m.def("set_activation_cache_limit", &vpns::set_activation_cache_limit, py::arg("bytes"),
        "Caps the idle activation buffers kept for reuse (0: keep none); frees what is over. Returns the old cap.");
  m.def("set_streamed_output_bytes", &vpns::set_streamed_output_bytes, py::arg("bytes"),
        "Sparse 1x1 convolutions whose output has at least `bytes` bytes write it with non-temporal (streaming)\n"
        "stores (AVX2 and AVX-512 kernels; 8 MiB by default, 0: every such output). Returns the previous threshold.\n"
        "Read once per call. For tests and for comparing both ways on a machine.");
  m.def("set_in_place_residual_bytes", &vpns::set_in_place_residual_bytes, py::arg("bytes"),
        "Sparse convolutions called with residual_reusable=True write their output into the residual where it has at\n"
        "least `bytes` bytes and is not streamed (1 MiB by default, 0: every such output). Returns the previous\n"
        "threshold. Read once per call. For tests and for comparing both ways on a machine.");
  m.def("in_place_residual_bytes", &vpns::in_place_residual_threshold,
        "The threshold set_in_place_residual_bytes sets (read without changing it).");
  m.def("set_wide_tile_vectors", &vpns::set_wide_tile_vectors, py::arg("vectors"),
        "The most zmm vectors (12 to 14; 14 by default) a wide AVX-512 tile takes where that cuts a plane into fewer\n"
        "tiles without more vectors in all (14: ResNet's 14x14 planes in one tile). Returns the previous value. Read\n"
        "once per call. For tests and for comparing both ways on a machine.");
  m.def("set_wide_tiles", &vpns::set_wide_tiles, py::arg("enabled"),
        "Whether the AVX-512 sparse kernel takes tiles of up to 12-14 zmm vectors (set_wide_tile_vectors) rather\n"
        "than 6 (on by default). Returns the previous setting. Read once per call. For tests and for comparing both\n"
        "ways on a machine.");
  m.def("set_next_tile_prefetch", &vpns::set_next_tile_prefetch, py::arg("enabled"),
        "Whether sparse convolutions request the next tile's output and residual lines into L2 while each tile's\n"
        "epilogue runs (on by default). Returns the previous setting. Read once per call. For tests and for\n"
        "comparing both ways on a machine.");
  m.def("set_output_prefetch_for_write", &vpns::set_output_prefetch_for_write, py::arg("enabled"),
        "Whether the next tile's output lines are requested for writing (prefetchw: exclusive, the other core's copy\n"
        "invalidated; on by default) rather than for reading. Returns the previous setting. Read once per call. For\n"
        "tests and for comparing both ways on a machine.");
  m.def("set_private_planes_bytes", &vpns::set_private_planes_bytes, py::arg("bytes"),
        "Sparse convolutions of fewer than two images a thread whose input planes take at most `bytes` bytes (one\n"
        "thread), or twice that (two threads or more), have every thread build them in its own buffer, with two\n"
        "threads or more only the rows its share of output positions reads (512 KiB by default, 0: never). Returns\n"
        "the previous threshold. Read once per call. For tests and for comparing both ways on a machine.");
  m.def("private_planes_held_bytes", &vpns::private_planes_held_bytes,
        "Bytes the calling thread holds for the planes it builds privately (0 until it built some); each thread of\n"
        "the engine holds its own, kept for the thread's life.");
  m.def(
      "core_round_trip_ns", &vpns::core_round_trip_ns, py::arg("rounds") = 20000, py::arg("first_cpu") = 0,
      py::arg("second_cpu") = 1,
      "Nanoseconds of one cache-line round trip between two threads pinned to two of the CPUs the calling thread may\n"
      "run on (indices into that set), the mean over `rounds`. Linux only. Holds the GIL: run nothing else meanwhile.");
  m.def("sparse_kernel_isa", &vpns::sparse_kernel_isa,
        "Instruction set the sparse kernels use: 'avx512' (AVX-512F), 'avx2' (AVX2 + FMA) or 'scalar'; the widest\n"
        "this CPU has unless set_sparse_kernel_isa or VPNS_FAST_SPARSE_ISA (read at the first call) chose another.");
  m.def("sparse_tile_width", &vpns::sparse_tile_width, py::arg("positions"),
        "The output positions a tile of sparse_conv2d computes on a plane of `positions` positions (its output rows\n"
        "on the stored planes' width), with the kernel (sparse_kernel_isa) and set_wide_tiles as they are now.");
  m.def("sparse_kernel_isas", &vpns::sparse_kernel_isas,
        "Names of the sparse kernels' instruction sets this CPU runs, widest first.");
  m.def("sparse_kernel_isa_environment_note", &vpns::sparse_kernel_isa_environment_note,
        "'' unless VPNS_FAST_SPARSE_ISA (read once, by the extension only) names no instruction set; then a line\n"
        "saying it was ignored and which one runs.");
  m.def("set_sparse_kernel_isa", &vpns::set_sparse_kernel_isa, py::arg("name"),
        "Makes the sparse kernels use 'avx512', 'avx2' or 'scalar' (one of sparse_kernel_isas(); for tests and for\n"
        "comparing them in one process); the dense 1x1 kernel (pointwise_conv) runs 16-lane vectors with 'avx512'.\n"
        "Returns the previous choice. Not for use while kernels run.");
}
