// A compiled call plan: a converted network's calls for one input shape, recorded once (by
// vpns_fast.deploy.call_plan) and run as one C++ call, with no Python between the layers.
//
// Why: at batch 1 with sparse layers, the Python that reaches each layer (the traced graph's forward, the module tree,
// each layer's checks and caches) and torch's glue around the calls cost ResNet-50 at 5% kept 0.86-0.94 ms of a
// 17.3-18.4 ms call (a replay of the extension's calls, AVX2 host), and on the Zen 5 host 12% of the main thread's
// samples, while the second thread waited for it (docs/cpu-engine-runs.md). Each step here is the call the layer's own
// forward makes for that input, with the arguments it computed (offsets, packed weights, the residual decisions);
// vpns_fast.deploy.call_plan checks, when it builds a plan, that the plan's output equals the network's bit for bit.
#include "vpns_ops.h"

#include "activation.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>

#include <chrono>
#include <functional>
#include <memory>
#include <utility>

namespace vpns {

namespace {

// The epilogues' activation codes (activation.h): oneDNN's steps take none or ReLU, which the plan applies after the
// call (oneDNN's own ReLU turns NaN into 0); Winograd's kernel applies ReLU in its output loop.
using epilogue::kIdentity;
using epilogue::kRelu;

c10::OperatorHandle onednn_op(const char* name, const char* overload) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, overload);
}

// A step's name in step_names(): "+residual" when it adds a residual into a new output, "+=residual" when it adds the
// convolution into the residual in place.
std::string with_residual(const char* name, int64_t residual, bool into_residual) {
  return std::string(name) + (residual < 0 ? "" : into_residual ? "+=residual" : "+residual");
}

}  // namespace

CallPlan::CallPlan(int64_t slots, int64_t output_slot) : slots_(slots), output_slot_(output_slot) {
  TORCH_CHECK(slots >= 1 && output_slot >= 0 && output_slot < slots, "CallPlan: output slot ", output_slot, " out of ",
              slots, " slots");
}

void CallPlan::check_slots(std::initializer_list<int64_t> slots, int64_t residual) const {
  for (const int64_t slot : slots) {
    TORCH_CHECK(slot >= 0 && slot < slots_, "CallPlan: slot ", slot, " out of ", slots_);
  }
  TORCH_CHECK(residual >= -1 && residual < slots_, "CallPlan: residual slot ", residual, " out of ", slots_,
              " (-1: none)");
}

void CallPlan::watch(const at::Tensor& tensor) {
  TORCH_CHECK(!tensor.is_inference(), "CallPlan.watch: an inference tensor has no version counter to watch");
  watched_.push_back({tensor, tensor._version(), tensor.data_ptr()});
}

void CallPlan::release_after_last_step(std::vector<int64_t> slots) {
  TORCH_CHECK(!steps_.empty(), "CallPlan.release_after_last_step: no step yet");
  for (const int64_t slot : slots) check_slots({slot});
  releases_.back().insert(releases_.back().end(), slots.begin(), slots.end());
}

void CallPlan::add(std::string name, Step step) {
  names_.push_back(std::move(name));
  steps_.push_back(std::move(step));
  releases_.emplace_back();
}

void CallPlan::add_sparse_conv(int64_t input, int64_t residual, int64_t output,
                               std::shared_ptr<CheckedSegments> segments, std::shared_ptr<CheckedOffsets> offsets,
                               at::Tensor values, std::vector<int64_t> weight_shape, std::optional<at::Tensor> bias,
                               std::vector<int64_t> stride, std::vector<int64_t> padding, std::vector<int64_t> dilation,
                               int64_t activation, int64_t input_channel_stride, bool aligned_output,
                               bool residual_reusable) {
  check_slots({input, output}, residual);
  TORCH_CHECK(segments != nullptr && offsets != nullptr, "CallPlan.add_sparse_conv: segments or offsets is None");
  // "+=residual": allowed to write into it (the kernel does so where that pays, see sparse_conv2d)
  add(with_residual("sparse_conv", residual, residual_reusable), [=](std::vector<at::Tensor>& slot) {
    const std::optional<at::Tensor> added = residual < 0 ? std::nullopt : std::optional<at::Tensor>(slot[residual]);
    slot[output] = sparse_conv2d(slot[input], *segments, *offsets, values, weight_shape, bias, stride, padding,
                                 dilation, added, activation, input_channel_stride, aligned_output, residual_reusable);
  });
}

void CallPlan::add_sparse_conv_lanes(int64_t input, int64_t output, at::Tensor segments,
                                     std::shared_ptr<CheckedOffsets> offsets, at::Tensor values,
                                     std::vector<int64_t> weight_shape, std::optional<at::Tensor> bias,
                                     std::vector<int64_t> stride, std::vector<int64_t> padding,
                                     std::vector<int64_t> dilation, int64_t activation, bool aligned_output) {
  check_slots({input, output});
  TORCH_CHECK(offsets != nullptr, "CallPlan.add_sparse_conv_lanes: offsets is None");
  add("sparse_conv_lanes", [=](std::vector<at::Tensor>& slot) {
    slot[output] = sparse_conv2d_lanes(slot[input], segments, *offsets, values, weight_shape, bias, stride, padding,
                                       dilation, activation, aligned_output);
  });
}

void CallPlan::add_sparse_pointwise_generated(int64_t input, int64_t residual, int64_t output,
                                              std::shared_ptr<GeneratedPointwise> code, at::Tensor table,
                                              std::optional<at::Tensor> bias, int64_t activation, bool aligned_output) {
  check_slots({input, output}, residual);
  TORCH_CHECK(code != nullptr, "CallPlan.add_sparse_pointwise_generated: code is None");
  add(with_residual("sparse_pointwise_generated", residual, false), [=](std::vector<at::Tensor>& slot) {
    const std::optional<at::Tensor> added = residual < 0 ? std::nullopt : std::optional<at::Tensor>(slot[residual]);
    slot[output] = sparse_pointwise_generated(slot[input], code, table, bias, added, activation, aligned_output);
  });
}

void CallPlan::add_pointwise_conv(int64_t input, int64_t residual, int64_t output, at::Tensor packed,
                                  std::optional<at::Tensor> bias, bool relu, bool into_residual) {
  check_slots({input, output}, residual);
  add(with_residual("pointwise_conv", residual, into_residual), [=](std::vector<at::Tensor>& slot) {
    const std::optional<at::Tensor> added = residual < 0 ? std::nullopt : std::optional<at::Tensor>(slot[residual]);
    slot[output] = pointwise_conv(slot[input], packed, bias, added, relu, into_residual);
  });
}

void CallPlan::add_onednn_conv(int64_t input, int64_t residual, int64_t output, at::Tensor packed,
                               std::optional<at::Tensor> bias, std::vector<int64_t> padding,
                               std::vector<int64_t> stride, std::vector<int64_t> dilation, int64_t groups,
                               bool into_residual, int64_t activation) {
  check_slots({input, output}, residual);
  TORCH_CHECK(activation == kIdentity || activation == kRelu, "CallPlan.add_onednn_conv: activation ", activation,
              " (only none or relu)");
  // the overloads DenseConv2d._onednn calls, with the same arguments
  const c10::OperatorHandle op = residual < 0    ? onednn_op("mkldnn::_convolution_pointwise", "")
                                 : into_residual ? onednn_op("mkldnn::_convolution_pointwise_", "binary")
                                                 : onednn_op("mkldnn::_convolution_pointwise", "binary");
  const c10::List<std::optional<at::Scalar>> no_scalars;
  add(with_residual("onednn_conv", residual, into_residual), [=](std::vector<at::Tensor>& slot) {
    torch::jit::Stack stack;
    if (residual < 0) {
      stack = {slot[input],         packed,     bias,           padding, stride, dilation, groups,
               std::string("none"), no_scalars, std::string("")};
    } else if (into_residual) {
      stack = {slot[residual], slot[input],        packed,          bias,          padding,    stride,       dilation,
               groups,         std::string("add"), at::Scalar(1.0), c10::IValue(), no_scalars, c10::IValue()};
    } else {
      stack = {slot[input], slot[residual],     packed,        bias,          padding,    stride,         dilation,
               groups,      std::string("add"), c10::IValue(), c10::IValue(), no_scalars, std::string("")};
    }
    op.callBoxed(stack);
    at::Tensor out = stack.back().toTensor();
    if (activation == kRelu) out.relu_();
    slot[output] = std::move(out);
  });
}

void CallPlan::add_winograd_conv(int64_t input, int64_t residual, int64_t output, at::Tensor weight,
                                 std::optional<at::Tensor> bias, std::vector<int64_t> padding, int64_t activation) {
  check_slots({input, output}, residual);
  TORCH_CHECK(activation == kIdentity || activation == kRelu, "CallPlan.add_winograd_conv: activation ", activation,
              " (only none or relu)");
  add(with_residual("winograd_conv", residual, false), [=](std::vector<at::Tensor>& slot) {
    const std::optional<at::Tensor> added = residual < 0 ? std::nullopt : std::optional<at::Tensor>(slot[residual]);
    slot[output] = winograd_conv2d(slot[input], weight, bias, padding, added, activation, 0);
  });
}

void CallPlan::add_channels_last_copy(int64_t input, int64_t output) {
  check_slots({input, output});
  add("channels_last_copy", [=](std::vector<at::Tensor>& slot) {
    const at::Tensor& x = slot[input];
    slot[output] = x.is_contiguous(at::MemoryFormat::ChannelsLast)
                       ? x
                       : empty_activation(x.sizes(), at::MemoryFormat::ChannelsLast).copy_(x);
  });
}

void CallPlan::add_contiguous(int64_t input, int64_t output) {
  check_slots({input, output});
  add("contiguous", [=](std::vector<at::Tensor>& slot) { slot[output] = slot[input].contiguous(); });
}

void CallPlan::add_max_pool(int64_t input, int64_t output, std::vector<int64_t> kernel_size,
                            std::vector<int64_t> stride, std::vector<int64_t> padding) {
  check_slots({input, output});
  add("max_pool",
      [=](std::vector<at::Tensor>& slot) { slot[output] = max_pool2d(slot[input], kernel_size, stride, padding); });
}

void CallPlan::add_adaptive_avg_pool(int64_t input, int64_t output, std::vector<int64_t> output_size) {
  check_slots({input, output});
  add("adaptive_avg_pool",
      [=](std::vector<at::Tensor>& slot) { slot[output] = at::adaptive_avg_pool2d(slot[input], output_size); });
}

void CallPlan::add_global_avg_pool(int64_t input, int64_t output) {
  check_slots({input, output});
  add("global_avg_pool", [=](std::vector<at::Tensor>& slot) { slot[output] = global_avg_pool2d(slot[input]); });
}

void CallPlan::add_flatten(int64_t input, int64_t output, int64_t start_dim, int64_t end_dim) {
  check_slots({input, output});
  add("flatten", [=](std::vector<at::Tensor>& slot) { slot[output] = at::flatten(slot[input], start_dim, end_dim); });
}

void CallPlan::add_dense_linear(int64_t input, int64_t output, at::Tensor weight, std::optional<at::Tensor> bias) {
  check_slots({input, output});
  add("dense_linear", [=](std::vector<at::Tensor>& slot) { slot[output] = dense_linear(slot[input], weight, bias); });
}

void CallPlan::add_sparse_linear(int64_t input, int64_t output, at::Tensor row_ptr, at::Tensor column_index,
                                 at::Tensor values, int64_t in_features, std::optional<at::Tensor> bias) {
  check_slots({input, output});
  add("sparse_linear", [=](std::vector<at::Tensor>& slot) {
    slot[output] = sparse_linear(slot[input], row_ptr, column_index, values, in_features, bias);
  });
}

void CallPlan::add_expect_sizes(int64_t input, std::vector<int64_t> sizes, std::vector<int64_t> strides) {
  check_slots({input});
  TORCH_CHECK(strides.empty() || strides.size() == sizes.size(), "CallPlan.add_expect_sizes: ", strides.size(),
              " strides for ", sizes.size(), " sizes");
  add("expect_sizes", [=](std::vector<at::Tensor>& slot) {
    const at::Tensor& x = slot[input];
    if (x.sizes() != at::IntArrayRef(sizes) || (!strides.empty() && x.strides() != at::IntArrayRef(strides))) {
      throw ShapeChanged();
    }
  });
}

std::optional<at::Tensor> CallPlan::run(const at::Tensor& input) const { return run_steps(input, nullptr); }

std::pair<std::optional<at::Tensor>, std::vector<double>> CallPlan::run_timed(const at::Tensor& input) const {
  std::vector<double> seconds;
  std::optional<at::Tensor> output = run_steps(input, &seconds);
  return {std::move(output), std::move(seconds)};
}

std::optional<at::Tensor> CallPlan::run_steps(const at::Tensor& input, std::vector<double>* seconds) const {
  // no step records a gradient, whether or not the caller turned them off (a plan's calls always ran under
  // torch.no_grad(); a deployed model's fast path now calls without it, whose enter and exit took 58 and 28 us right
  // after a call of ResNet-50 at 5% kept: bench/results/cpu-fast-path-ab-2026-12-07-intel-xeon.txt)
  at::NoGradGuard no_grad;
  for (const Watched& watched : watched_) {
    // changed in place since the plan was made, or given other memory (`.data = ...`, which the version misses)
    if (watched.tensor._version() != watched.version || watched.tensor.data_ptr() != watched.data) {
      return std::nullopt;
    }
  }
  std::vector<at::Tensor> slot(static_cast<size_t>(slots_));
  slot[0] = input;
  if (seconds != nullptr) seconds->reserve(steps_.size());
  std::chrono::steady_clock::time_point start;
  for (size_t i = 0; i < steps_.size(); ++i) {
    if (seconds != nullptr) start = std::chrono::steady_clock::now();  // not on a plain run's path
    steps_[i](slot);
    // the traced graph's forward drops each value after its last use too: an activation buffer goes back to
    // the cache (csrc/buffers.cpp) for the next layer's output
    for (const int64_t released : releases_[i]) slot[released].reset();
    if (seconds != nullptr) {
      seconds->push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
  }
  return slot[output_slot_];
}

}  // namespace vpns
