// A deployed CPU model's input stage in one pass: images (uint8 in [0, 255] or float32 in [0, 1]) normalized per
// channel as vpns_fast.nn.prompts.normalize does, bit for bit ((x / 255 - mean) / std for uint8, (x - mean) / std for
// float32, each operation rounded to float32 as torch's are), with the float pixels' smallest and largest value found
// on the way. input_stage decides which images the pass takes; the range rule (vpns_fast.data.check_float_pixel_range)
// and the errors stay in Python, so both of DeployedModel's paths (its fast path and _network_input) share one list of
// conditions here and one rule there.
//
// Why: DeployedModel's input stage was five torch calls (aminmax, float, divide, subtract, divide); right after a call
// of the network (whose kernels evict everything from the caches) they took 0.16-0.19 ms of ResNet-50's 10 ms at 10%
// kept, batch 1 (2-vCPU Zen 5, 2 threads, medians of 100 calls, 2026-12-06). This pass: 0.07 ms in the call for uint8
// images, 0.09 ms for float32 since their range runs in lanes (below); end to end 1.003-1.019x (ResNet-18 and -50 at
// 10% and 50% kept, batch 1, uint8 and float32 images, bench/results/cpu-input-stage-ab-2026-12-06-amd-scratch.txt;
// that A/B also wrote the input channels_last where the first layer is a dense convolution, a version removed since: a
// first layer the user swaps in later would still have got that layout).
#include "vpns_ops.h"

#include <ATen/Parallel.h>
#include <torch/csrc/jit/frontend/tracer.h>

#include <algorithm>
#include <limits>
#include <vector>

namespace vpns {

namespace {

// One image row of channel c: src[0, width) -> dst[0, width). -ffp-contract stays off in ISO C++, so (x - m) / s is
// two roundings, as torch's. The float range runs in kLanes independent lanes, each `x < low ? x : low` (MINPS's own
// rule, which the compiler emits for it; a NaN pixel leaves the lane as it was and is caught by `x != x`): written
// as one running std::min/std::max, the reduction stayed scalar (GCC does not vectorize a float min reduction that
// must honour NaN), and float32 images took 0.22 ms for one 224x224 image on two threads against uint8's 0.03 ms
// (2-vCPU Zen 5, 2026-12-06). Built for AVX-512, AVX2 and the baseline, picked at load (target_clones, on x86-64).
constexpr int64_t kLanes = 16;

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void normalize_bytes(const uint8_t* src, int64_t width, float mean, float stdev, float* dst) {
  for (int64_t j = 0; j < width; ++j) {
    const float x = static_cast<float>(src[j]) / 255.0f;
    dst[j] = (x - mean) / stdev;
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void normalize_floats(const float* src, int64_t width, float mean, float stdev, float* dst, float* low, float* high,
                      bool* nan) {
  float lows[kLanes], highs[kLanes];
  int nans[kLanes];
  for (int64_t k = 0; k < kLanes; ++k) {
    lows[k] = *low;
    highs[k] = *high;
    nans[k] = 0;
  }
  const int64_t whole = width - width % kLanes;
  for (int64_t j = 0; j < whole; j += kLanes) {
    for (int64_t k = 0; k < kLanes; ++k) {
      const float x = src[j + k];
      nans[k] |= x != x;
      lows[k] = x < lows[k] ? x : lows[k];
      highs[k] = x > highs[k] ? x : highs[k];
      dst[j + k] = (x - mean) / stdev;
    }
  }
  for (int64_t j = whole; j < width; ++j) {
    const float x = src[j];
    nans[0] |= x != x;
    lows[0] = x < lows[0] ? x : lows[0];
    highs[0] = x > highs[0] ? x : highs[0];
    dst[j] = (x - mean) / stdev;
  }
  for (int64_t k = 0; k < kLanes; ++k) {
    *low = std::min(*low, lows[k]);
    *high = std::max(*high, highs[k]);
    *nan |= nans[k] != 0;
  }
}

// The pass over images input_stage has taken (a 4-d uint8 or float32 CPU tensor, one mean and std per channel).
std::tuple<at::Tensor, double, double> normalize_images(const at::Tensor& images, const std::vector<double>& mean,
                                                        const std::vector<double>& stdev) {
  const int64_t batch = images.size(0), channels = images.size(1), height = images.size(2), width = images.size(3);
  const at::Tensor x = images.contiguous();
  // from the engine's cache of touched buffers where 64 KiB or more (csrc/buffers.cpp), as the layers' outputs
  at::Tensor out = empty_activation({batch, channels, height, width});
  const bool bytes = images.scalar_type() == at::kByte;
  // work items: image rows (n, y), each with all its channels
  const int64_t rows = batch * height;
  // each thread's range, folded after (no shared writes inside the loop)
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  std::vector<float> lows(threads, std::numeric_limits<float>::infinity());
  std::vector<float> highs(threads, -std::numeric_limits<float>::infinity());
  std::vector<char> nans(threads, 0);
  float* y = out.mutable_data_ptr<float>();
  // rows of 1-3 KB: a grain of 16 rows keeps a 224x224 image on both threads
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    const int64_t t = std::min<int64_t>(at::get_thread_num(), threads - 1);
    float low = lows[t], high = highs[t];
    bool nan = nans[t] != 0;
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / height, row = r % height;
      for (int64_t c = 0; c < channels; ++c) {
        const int64_t source = ((n * channels + c) * height + row) * width;  // NCHW
        float* dst = y + source;
        const float m = static_cast<float>(mean[c]), s = static_cast<float>(stdev[c]);
        if (bytes) {
          normalize_bytes(x.const_data_ptr<uint8_t>() + source, width, m, s, dst);
        } else {
          normalize_floats(x.const_data_ptr<float>() + source, width, m, s, dst, &low, &high, &nan);
        }
      }
    }
    lows[t] = std::min(lows[t], low);
    highs[t] = std::max(highs[t], high);
    nans[t] = nan;
  });
  // every byte lies in [0, 1] once divided by 255; no pixel lies outside it in an empty batch
  if (bytes || images.numel() == 0) return {out, 0.0, 1.0};
  const bool nan = std::any_of(nans.begin(), nans.end(), [](char v) { return v != 0; });
  const double quiet_nan = std::numeric_limits<double>::quiet_NaN();
  // + 0.0f: a zero extreme is reported as +0.0 whichever sign its pixel had (which zero a lane keeps depends on the
  // order it met them in, as torch.aminmax's does)
  const float low = *std::min_element(lows.begin(), lows.end()) + 0.0f;
  const float high = *std::max_element(highs.begin(), highs.end()) + 0.0f;
  return {out, nan ? quiet_nan : static_cast<double>(low), nan ? quiet_nan : static_cast<double>(high)};
}

}  // namespace

std::optional<std::tuple<at::Tensor, double, double>> input_stage(const at::Tensor& images,
                                                                  const std::vector<double>& mean,
                                                                  const std::vector<double>& stdev, int64_t height,
                                                                  int64_t width) {
  // the one list of what the one-pass stage takes; the rest goes to DeployedModel's general path
  if (torch::jit::tracer::isTracing() || !images.defined() || images.layout() != at::kStrided || images.is_nested() ||
      !images.device().is_cpu() || images.dim() != 4 || images.size(1) != 3 ||
      (height > 0 && (images.size(2) != height || images.size(3) != width)) ||
      (images.scalar_type() != at::kByte && images.scalar_type() != at::kFloat) || images.requires_grad() ||
      mean.size() != 3 || stdev.size() != 3) {
    return std::nullopt;
  }
  return normalize_images(images, mean, stdev);
}

}  // namespace vpns
