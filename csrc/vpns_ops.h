// Declarations of every op in the extension vpns_fast._C; csrc/module.cpp binds them.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

// A plain loop the compiler vectorizes, built for AVX2 and for the baseline ISA (SSE2), the one to run chosen when the
// extension loads (pooling, Winograd's transforms).
#if defined(__x86_64__) && defined(__GNUC__)
#define VPNS_AVX2_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VPNS_AVX2_CLONES
#endif

namespace vpns {

// A pass over an activation requests the lines it reads next, kReadAheadFloats (2 KiB) ahead: such a pass reads what
// both cores have just written, and the hardware prefetchers did not bring the other core's lines ahead of the reads
// (csrc/mean_pool.cpp and csrc/max_pool.cpp have the measurements). read_ahead requests the lines from `requested` up
// to kReadAheadFloats past `reached`, never past `end`, and moves `requested` on.
constexpr int64_t kReadAheadFloats = 2048 / sizeof(float);
inline void read_ahead(const float*& requested, const float* reached, const float* end) {
  for (const float* ahead = std::min(end, reached + kReadAheadFloats); requested < ahead; requested += 16) {
    __builtin_prefetch(requested, 0, 3);
  }
}

// csrc/threshold.cpp
at::Tensor topk_threshold(const std::vector<at::Tensor>& tensors, int64_t k, std::optional<double> hint);

// csrc/sparse_conv.cpp
std::vector<at::Tensor> sparse_conv2d_pack(const at::Tensor& weight);
std::vector<at::Tensor> sparse_conv2d_offsets(const at::Tensor& row_ptr, const at::Tensor& channel_index,
                                              const at::Tensor& tap_index, const at::Tensor& values,
                                              std::vector<int64_t> weight_shape, std::vector<int64_t> input_size,
                                              std::vector<int64_t> stride, std::vector<int64_t> padding,
                                              std::vector<int64_t> dilation, int64_t channel_block,
                                              int64_t input_channel_stride);
at::Tensor sparse_conv2d(const at::Tensor& input, const at::Tensor& segments, const at::Tensor& offsets,
                         const at::Tensor& values, const std::vector<int64_t>& weight_shape,
                         const std::optional<at::Tensor>& bias, const std::vector<int64_t>& stride,
                         const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
                         const std::optional<at::Tensor>& residual, int64_t activation, int64_t input_channel_stride,
                         bool aligned_output, bool residual_reusable);
// Offsets from sparse_conv2d_offsets, copied and their smallest and largest value found once: sparse_conv2d then checks
// them against its input without reading them all at every call (a pass that cost ResNet-50 2.8% of its time at 10%
// kept and batch 1). The copy is this object's own and Python cannot reach it, so it cannot change behind the range.
struct CheckedOffsets {
  explicit CheckedOffsets(const at::Tensor& source);
  at::Tensor offsets;
  int32_t lo, hi;
  int32_t bits;  // every offset OR-ed: the low bits no offset sets say which multiple all of them are (batch_lanes)
};
at::Tensor sparse_conv2d(const at::Tensor& input, const at::Tensor& segments, const CheckedOffsets& offsets,
                         const at::Tensor& values, const std::vector<int64_t>& weight_shape,
                         const std::optional<at::Tensor>& bias, const std::vector<int64_t>& stride,
                         const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
                         const std::optional<at::Tensor>& residual, int64_t activation, int64_t input_channel_stride,
                         bool aligned_output, bool residual_reusable);
// Segments from sparse_conv2d_offsets, copied and found non-decreasing from 0 once (SparseConv2d keeps them so per
// input size, beside the CheckedOffsets, for its calls and its call plans' steps): sparse_conv2d then reads only their
// ends at each call (their count and last entry against the values), not every entry. The copy is this object's own,
// so nothing can change it behind the check. Why: that pass, the shape vectors copied and the geometry's tables
// allocated at each call ran on the thread that starts each step while the other waited (perf of ResNet-50 at 5% kept,
// batch 1, 2-vCPU Intel Xeon, its samples not kept; the A/B of the whole, 1.069x, is in csrc/buffers.cpp). Kept by the
// layer rather than copied by each plan step: one copy a layer and input size. A call outside a plan skips the pass
// too, which alone is within the calls' noise there (-1.9 to +1.2 us on 77-221 us calls, five ResNet-50 layers at 5%
// kept, bench/results/cpu-checked-segments-eager-2026-12-07-intel-xeon.txt).
struct CheckedSegments {
  explicit CheckedSegments(const at::Tensor& source);
  at::Tensor segments;
};
at::Tensor sparse_conv2d(const at::Tensor& input, const CheckedSegments& segments, const CheckedOffsets& offsets,
                         const at::Tensor& values, const std::vector<int64_t>& weight_shape,
                         const std::optional<at::Tensor>& bias, const std::vector<int64_t>& stride,
                         const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
                         const std::optional<at::Tensor>& residual, int64_t activation, int64_t input_channel_stride,
                         bool aligned_output, bool residual_reusable);
// csrc/batch_lanes.cpp: a sparse 3x3 convolution with the batch in the AVX-512 lanes, for batches that are a multiple
// of 16 (see the file). Whether it takes this geometry (3x3, padding 1, dilation 1, stride 1 or 2, a 7x7 or 14x14
// output); its packing of sparse_conv2d_pack's nonzeros for an input size: [offsets, segments, values]; the call.
bool sparse_conv2d_lanes_supported(const std::vector<int64_t>& weight_shape, const std::vector<int64_t>& input_size,
                                   const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                                   const std::vector<int64_t>& dilation);
std::vector<at::Tensor> sparse_conv2d_lanes_pack(const at::Tensor& row_ptr, const at::Tensor& channel_index,
                                                 const at::Tensor& tap_index, const at::Tensor& values,
                                                 std::vector<int64_t> weight_shape, std::vector<int64_t> input_size,
                                                 std::vector<int64_t> stride, std::vector<int64_t> padding,
                                                 std::vector<int64_t> dilation);
at::Tensor sparse_conv2d_lanes(const at::Tensor& input, const at::Tensor& segments, const CheckedOffsets& offsets,
                               const at::Tensor& values, std::vector<int64_t> weight_shape,
                               const std::optional<at::Tensor>& bias, std::vector<int64_t> stride,
                               std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t activation,
                               bool aligned_output);
// csrc/generated_conv.cpp: a sparse 1x1 convolution (stride 1, no padding) for batches that are a multiple of 16,
// the batch in the AVX-512 lanes, its sums run as machine code written for the layer's nonzeros (see the file): the
// same outputs as sparse_conv2d bit for bit. Whether it takes this geometry (x86-64 Linux); the code for
// sparse_conv2d_pack's row_ptr / channel_index / values at input_size (H, W), with its weights in the order it reads
// them; the call.
struct GeneratedPointwise {  // one layer's code, executable, and what it was written for
  int64_t in_channels = 0, out_channels = 0, plane = 0;
  int64_t pitch = 0;             // vectors from one input channel's copy in the lanes to the next (odd_pitch)
  int64_t chunk = 0;             // positions a call of a block's code computes (its window: chunk x C_in vectors)
  int64_t span = 0;              // positions a work item sums before its epilogue
  int64_t sums_pitch = 0;        // vectors from one row of a block's sums to the next, as the code stores them
  int64_t rows_a_block = 0;      // output channels a function of the code computes
  int64_t weights = 0;           // the table's length
  std::vector<int64_t> entries;  // each block's function: its byte offset in the code
  void* memory = nullptr;
  size_t size = 0;
  GeneratedPointwise() = default;
  GeneratedPointwise(const GeneratedPointwise&) = delete;
  GeneratedPointwise& operator=(const GeneratedPointwise&) = delete;
  ~GeneratedPointwise();  // unmaps the code
};
bool sparse_pointwise_generated_supported(const std::vector<int64_t>& weight_shape,
                                          const std::vector<int64_t>& input_size, const std::vector<int64_t>& stride,
                                          const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation);
std::tuple<std::shared_ptr<GeneratedPointwise>, at::Tensor> sparse_pointwise_generate(const at::Tensor& row_ptr,
                                                                                      const at::Tensor& channel_index,
                                                                                      const at::Tensor& values,
                                                                                      std::vector<int64_t> weight_shape,
                                                                                      std::vector<int64_t> input_size);
at::Tensor sparse_pointwise_generated(const at::Tensor& input, const std::shared_ptr<GeneratedPointwise>& code,
                                      const at::Tensor& table, const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& residual, int64_t activation,
                                      bool aligned_output);
bool pointwise_conv_supported();
// F.linear(input, weight, bias) for a 2-d float32 input of a few rows, the output features shared out over the
// threads; needs pointwise_conv_supported().
at::Tensor dense_linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
at::Tensor pointwise_conv_pack(const at::Tensor& weight);
at::Tensor pointwise_conv(const at::Tensor& input, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual, bool relu, bool into_residual);
// Output channels in a packed panel of pointwise_conv_pack's layout, [C_out / 16][C_in][16] (Winograd's panels too).
constexpr int64_t kPanelWidth = 16;
// `count` rows cut into blocks of about 48 rows, as even as they can be and none empty: {rows a block, blocks}.
struct RowBlocks {
  int64_t rows;
  int64_t count;
};
RowBlocks even_row_blocks(int64_t count);
// c[i, j] = act(bias[j] + sum_l a[i, l] * w[l, j] (+ residual[i, j])) for rows i < `rows` of `a` (k floats apart) and
// the output channels of panels [first_panel, last_panel) of `panels` (pointwise_conv_pack's layout, [panels][k][16]);
// c and residual rows ldc floats apart, bias and residual optional (nullptr). One thread; the wide or AVX2 tile as
// avx512_kernels_chosen() says. Needs pointwise_conv_supported().
void packed_panels_product(const float* a, int64_t rows, int64_t k, const float* panels, int64_t first_panel,
                           int64_t last_panel, float* c, int64_t ldc, const float* bias, const float* residual,
                           bool relu);
std::vector<at::Tensor> sparse_linear_pack(const at::Tensor& weight);
at::Tensor sparse_linear(const at::Tensor& input, const at::Tensor& row_ptr, const at::Tensor& column_index,
                         const at::Tensor& values, int64_t in_features, const std::optional<at::Tensor>& bias);
// out[o] = bias[o] (0 without one) + sum over row o's nonzeros k (row_ptr[o] <= k < row_ptr[o + 1]) of
// values[k] * x[columns[k]], for o in [begin, end): the sparse linear layer's product for one input row, one thread,
// with gathers of vector_width lanes (16: AVX-512, 8: AVX2 and FMA, else the portable loop; the caller checks the
// CPU has them); in_features >= 1. Every index is clamped into [0, in_features) before it is read; false when any was
// outside it.
bool gathered_row_products(const float* x, int64_t in_features, const int64_t* row_ptr, const int32_t* columns,
                           const float* values, const float* bias, float* out, int64_t begin, int64_t end,
                           int vector_width);
// 1x1 convolution outputs of at least `bytes` are written with streaming stores (AVX2 / AVX-512 kernels); returns
// the previous threshold.
int64_t set_streamed_output_bytes(int64_t bytes);
// Sparse convolutions allowed to reuse their residual (residual_reusable) write into it where the output has at least
// `bytes` bytes and is not streamed (kInPlaceResidualBytes in csrc/sparse_conv.cpp); returns the previous threshold.
int64_t set_in_place_residual_bytes(int64_t bytes);
int64_t in_place_residual_threshold();  // the threshold in force
// Whether sparse convolutions request the next tile's output and residual lines during each tile's epilogue;
// returns the previous setting.
bool set_next_tile_prefetch(bool enabled);
// Whether the AVX-512 sparse kernel takes tiles of up to 12-14 zmm vectors rather than 6 (on by default); returns the
// previous setting.
bool set_wide_tiles(bool enabled);
// The most zmm vectors (12-14; 14 by default) a wide tile takes where that cuts a plane into fewer tiles without more
// vectors in all; returns the previous value.
int64_t set_wide_tile_vectors(int64_t vectors);
// Sparse convolutions of fewer than 2 images a thread whose planes take at most `bytes` have every thread build them
// in its own buffer; returns the previous threshold.
int64_t set_private_planes_bytes(int64_t bytes);
// Bytes of the calling thread's own planes buffer (0 until a call on this thread built planes privately).
int64_t private_planes_held_bytes();
// Whether those requests ask for the output lines for writing (prefetchw; on by default) rather than reading;
// returns the previous setting.
bool set_output_prefetch_for_write(bool enabled);
// csrc/max_pool.cpp
at::Tensor max_pool2d(const at::Tensor& input, std::vector<int64_t> kernel_size, std::vector<int64_t> stride,
                      std::vector<int64_t> padding);
// csrc/mean_pool.cpp: [N, C, 1, 1], each channel's mean over its plane (contiguous or channels_last input).
at::Tensor global_avg_pool2d(const at::Tensor& input);

// csrc/winograd.cpp: act(conv3x3(input) + bias (+ residual)), stride 1, by F(4x4, 3x3); weight from winograd_weight.
at::Tensor winograd_conv2d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           std::vector<int64_t> padding, const std::optional<at::Tensor>& residual, int64_t activation,
                           int64_t chunk_tiles);

// csrc/core_latency.cpp: nanoseconds of one cache-line round trip between two threads pinned to CPUs first_cpu and
// second_cpu (indices into the CPUs the calling thread may run on), over `rounds` round trips. Linux only.
double core_round_trip_ns(int64_t rounds, int64_t first_cpu, int64_t second_cpu);

// csrc/buffers.cpp: float32 tensors for the engine's large activations, from a cache of touched buffers.
at::Tensor empty_activation(at::IntArrayRef sizes, at::MemoryFormat memory_format = at::MemoryFormat::Contiguous);
// A contiguous float32 tensor from that cache whatever its size: a kernel's scratch, taken on every call.
at::Tensor empty_scratch(at::IntArrayRef sizes);
// t itself when contiguous, else a contiguous copy in such a tensor (a channels_last activation from a dense
// layer: at batch 32 a 103 MB copy from malloc faults in every page again on each call).
at::Tensor contiguous_activation(const at::Tensor& t);
int64_t cached_activation_bytes();
int64_t set_activation_cache_limit(int64_t bytes);  // returns the previous limit

// Which instruction set the sparse kernels run with: "avx512", "avx2" or "scalar" (the widest this CPU has, unless
// chosen otherwise).
std::string sparse_kernel_isa();
// The output positions a tile of sparse_conv2d computes on a plane of `positions` positions, with the kernel and
// settings chosen now (even_tile).
int64_t sparse_tile_width(int64_t positions);
// Whether that ISA is "avx512": the dense 1x1 kernel (pointwise_conv) then runs 16-lane vectors too, one choice for
// both.
bool avx512_kernels_chosen();
// Floats from one channel to the next in an aligned output whose planes hold `plane` floats (sparse_conv2d's
// aligned_output; the one statement of the rule, which Python reads too).
int64_t aligned_channel_stride(int64_t plane);
// The floats between the planes of an aligned output (`planes` planes of `plane` floats, `stride` apart) set to zero,
// as sparse_conv2d leaves them (a 1x1 conv reading it in place sums them into positions it drops); nothing where
// stride == plane. For the kernels that write such outputs outside sparse_conv2d (batch_lanes, generated_conv).
void zero_aligned_padding(float* out, int64_t planes, int64_t plane, int64_t stride);
// The pitch, in 64-byte vectors, between the channels (or rows of sums) that the batch-in-lanes kernels lay out at
// `vectors` a piece: an odd number, so that one position of consecutive channels falls in different L1 sets. A
// 14x14 plane is 196 vectors (4 mod 64: the same position of every channel in 16 of the 64 sets), a 28x28 one 784
// (4 sets), a 56x56 one 3136 (one set). Measured 2026-12-07 (2-vCPU Intel Xeon with 48 KiB L1d, 2 threads, batch
// 32, 10% kept, per-call ratios even / odd over 40 rounds): the generated code's 256 -> 1024 at 14x14 1.44x (p20-p80
// 1.25-1.64x), 1024 -> 256 at 14x14 1.03x; the batch-in-lanes 3x3 kernel's stride-1 planes (17 x 16 and 10 x 9
// vectors) 1.03x and 1.01x; layouts odd already (7x7 planes of the generated code, stride-2 3x3 planes) 1.00-1.01x.
inline int64_t odd_pitch(int64_t vectors) { return vectors | 1; }
// Names of the ISAs this CPU runs, widest first.
std::vector<std::string> sparse_kernel_isas();
// "" unless VPNS_FAST_SPARSE_ISA names no ISA: then what was ignored and what runs instead.
std::string sparse_kernel_isa_environment_note();
// Makes the sparse kernels run with `name` (one this CPU has); returns the previous choice.
std::string set_sparse_kernel_isa(const std::string& name);

// csrc/input_stage.cpp: a deployed CPU model's input stage where its one pass takes the images (not traced, a strided
// CPU tensor, not nested, [N, 3, height, width] (height 0: any size), uint8 or float32, no gradient, three means and
// stds): (normalized, low, high), the images normalized per channel as vpns_fast.nn.prompts.normalize does, bit for
// bit, contiguous float32, and the pixels' smallest and largest value on the [0, 1] scale (NaN for both where one is
// NaN; 0 and 1 for uint8 images and an empty batch, which have none outside it); else None, without raising: the
// caller's general path checks those images one by one, with its messages.
std::optional<std::tuple<at::Tensor, double, double>> input_stage(const at::Tensor& images,
                                                                  const std::vector<double>& mean,
                                                                  const std::vector<double>& stdev, int64_t height,
                                                                  int64_t width);

// csrc/call_plan.cpp: a converted network's calls for one input shape, run as one call (vpns_fast.deploy.call_plan
// records them). Values live in numbered slots: slot 0 holds the input, each step reads slots (-1: none) and writes
// one; a step's arguments are the ones the layer's own forward computed for that input.
// What CallPlan::run throws when a tensor's shape differs from the one the plan was made with (add_expect_sizes): the
// plan does not apply to this input.
struct ShapeChanged : std::runtime_error {
  ShapeChanged() : std::runtime_error("CallPlan: a shape the plan kept as a value changed") {}
};

class CallPlan {
 public:
  CallPlan(int64_t slots, int64_t output_slot);
  // run() gives nullopt once `tensor` has changed in place (its version counter moved) or been given other memory
  // since this call.
  void watch(const at::Tensor& tensor);
  // Slots emptied after the last step added (nothing later reads them), as the traced graph drops its values.
  void release_after_last_step(std::vector<int64_t> slots);
  void add_sparse_conv(int64_t input, int64_t residual, int64_t output, std::shared_ptr<CheckedSegments> segments,
                       std::shared_ptr<CheckedOffsets> offsets, at::Tensor values, std::vector<int64_t> weight_shape,
                       std::optional<at::Tensor> bias, std::vector<int64_t> stride, std::vector<int64_t> padding,
                       std::vector<int64_t> dilation, int64_t activation, int64_t input_channel_stride,
                       bool aligned_output, bool residual_reusable);
  void add_sparse_conv_lanes(int64_t input, int64_t output, at::Tensor segments,
                             std::shared_ptr<CheckedOffsets> offsets, at::Tensor values,
                             std::vector<int64_t> weight_shape, std::optional<at::Tensor> bias,
                             std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                             int64_t activation, bool aligned_output);
  void add_pointwise_conv(int64_t input, int64_t residual, int64_t output, at::Tensor packed,
                          std::optional<at::Tensor> bias, bool relu, bool into_residual);
  void add_sparse_pointwise_generated(int64_t input, int64_t residual, int64_t output,
                                      std::shared_ptr<GeneratedPointwise> code, at::Tensor table,
                                      std::optional<at::Tensor> bias, int64_t activation, bool aligned_output);
  // oneDNN's convolution (torch's mkldnn::_convolution_pointwise overloads), then ReLU in place when activation is 1.
  void add_onednn_conv(int64_t input, int64_t residual, int64_t output, at::Tensor packed,
                       std::optional<at::Tensor> bias, std::vector<int64_t> padding, std::vector<int64_t> stride,
                       std::vector<int64_t> dilation, int64_t groups, bool into_residual, int64_t activation);
  void add_winograd_conv(int64_t input, int64_t residual, int64_t output, at::Tensor weight,
                         std::optional<at::Tensor> bias, std::vector<int64_t> padding, int64_t activation);
  // input itself when channels_last, else a channels_last copy in an activation buffer.
  void add_channels_last_copy(int64_t input, int64_t output);
  void add_contiguous(int64_t input, int64_t output);
  void add_max_pool(int64_t input, int64_t output, std::vector<int64_t> kernel_size, std::vector<int64_t> stride,
                    std::vector<int64_t> padding);
  void add_adaptive_avg_pool(int64_t input, int64_t output, std::vector<int64_t> output_size);
  void add_global_avg_pool(int64_t input, int64_t output);
  void add_flatten(int64_t input, int64_t output, int64_t start_dim, int64_t end_dim);
  void add_dense_linear(int64_t input, int64_t output, at::Tensor weight, std::optional<at::Tensor> bias);
  void add_sparse_linear(int64_t input, int64_t output, at::Tensor row_ptr, at::Tensor column_index, at::Tensor values,
                         int64_t in_features, std::optional<at::Tensor> bias);
  using Step = std::function<void(std::vector<at::Tensor>&)>;
  // A step of another kind (csrc/module.cpp adds the one that calls back into Python), named `name`.
  void add(std::string name, Step step);
  // TORCH_CHECKs that each slot is one of the plan's, and `residual` too or -1 (none).
  void check_slots(std::initializer_list<int64_t> slots, int64_t residual = -1) const;
  // A step that throws ShapeChanged unless the tensor in `input` has these sizes (and strides, unless empty): where the
  // plan kept a value that the tensor's shape gave when the plan was made (an `x.size(0)`), or before a kernel step
  // made for that shape reads a tensor that a Python step made (whose shape the data may decide).
  void add_expect_sizes(int64_t input, std::vector<int64_t> sizes, std::vector<int64_t> strides = {});
  // The network's output for `input`, or nullopt when a watched tensor changed (the plan is stale). Safe to call
  // from several threads at once: each call has its own slots.
  std::optional<at::Tensor> run(const at::Tensor& input) const;
  // run(), and the seconds each step took (empty when the plan is stale): where the time goes inside a whole call,
  // each step's caches as the steps before it leave them.
  std::pair<std::optional<at::Tensor>, std::vector<double>> run_timed(const at::Tensor& input) const;
  int64_t steps() const { return static_cast<int64_t>(steps_.size()); }
  // The kind of each step, in order ("sparse_conv", "onednn_conv+=residual", ...): what the plan calls.
  const std::vector<std::string>& step_names() const { return names_; }

 private:
  int64_t slots_, output_slot_;
  std::vector<Step> steps_;
  std::vector<std::string> names_;
  std::vector<std::vector<int64_t>> releases_;
  // run() and run_timed(): `seconds` (when not null) gets each step's time
  std::optional<at::Tensor> run_steps(const at::Tensor& input, std::vector<double>* seconds) const;
  struct Watched {
    at::Tensor tensor;
    int64_t version;
    const void* data;
  };
  std::vector<Watched> watched_;
};

}  // namespace vpns
