// A deployed CPU model's input stage in one pass: images (uint8 in [0, 255] or float32 in [0, 1]) normalized per
// channel as vpns_fast.nn.prompts.normalize does, bit for bit ((x / 255 - mean) / std for uint8, (x - mean) / std for
// float32, each operation rounded to float32 as torch's are), with the float pixels' smallest and largest value found
// on the way (the range check).
//
// Why: DeployedModel's input stage was five torch calls (aminmax, float, divide, subtract, divide); right after a call
// of the network (whose kernels evict everything from the caches) they took 0.16-0.19 ms of ResNet-50's 10 ms at 10%
// kept, batch 1 (2-vCPU Zen 5, 2 threads, medians of 100 calls, 2026-12-06). This pass: 0.07 ms in the call; end to
// end 1.003-1.019x (ResNet-18 and -50 at 10% and 50% kept, batch 1, uint8 and float32 images,
// bench/results/cpu-input-stage-ab-2026-12-06-amd-scratch.txt; that A/B also wrote the input channels_last where
// the first layer is a dense convolution, a version removed since: a first layer the user swaps in later would still
// have got that layout).
#include "vpns_ops.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace vpns {

namespace {

// One image row of channel c: src[0, width) -> dst[0, width). Plain loops, which the compiler vectorizes;
// -ffp-contract stays off in ISO C++, so (x - m) / s is two roundings, as torch's.
template <typename T>
void normalize_row(const T* src, int64_t width, float mean, float stdev, float* dst, float* low, float* high,
                   bool* nan) {
  if constexpr (std::is_same_v<T, uint8_t>) {
    for (int64_t j = 0; j < width; ++j) {
      const float x = static_cast<float>(src[j]) / 255.0f;
      dst[j] = (x - mean) / stdev;
    }
  } else {
    float lo = *low, hi = *high;
    bool seen = false;
    for (int64_t j = 0; j < width; ++j) {
      const float x = src[j];
      seen |= x != x;
      lo = std::min(lo, x);
      hi = std::max(hi, x);
      dst[j] = (x - mean) / stdev;
    }
    *low = lo;
    *high = hi;
    *nan |= seen;
  }
}

}  // namespace

std::tuple<at::Tensor, double, double> normalize_images(const at::Tensor& images, std::vector<double> mean,
                                                        std::vector<double> stdev) {
  constexpr const char* op = "normalize_images";
  TORCH_CHECK(images.device().is_cpu() && images.dim() == 4 &&
                  (images.scalar_type() == at::kByte || images.scalar_type() == at::kFloat),
              op, ": images must be a 4-d uint8 or float32 CPU tensor, got ", images.scalar_type(), " ", images.sizes(),
              " on ", images.device());
  const int64_t batch = images.size(0), channels = images.size(1), height = images.size(2), width = images.size(3);
  TORCH_CHECK(static_cast<int64_t>(mean.size()) == channels && static_cast<int64_t>(stdev.size()) == channels, op,
              ": one mean and one std per channel (", channels, "), got ", mean.size(), " and ", stdev.size());
  const at::Tensor x = images.contiguous();
  // from the engine's cache of touched buffers where 1 MiB or more (csrc/buffers.cpp), as the layers' outputs
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
          normalize_row(x.const_data_ptr<uint8_t>() + source, width, m, s, dst, &low, &high, &nan);
        } else {
          normalize_row(x.const_data_ptr<float>() + source, width, m, s, dst, &low, &high, &nan);
        }
      }
    }
    lows[t] = std::min(lows[t], low);
    highs[t] = std::max(highs[t], high);
    nans[t] = nan;
  });
  if (bytes) return {out, 0.0, 255.0};
  const bool nan = std::any_of(nans.begin(), nans.end(), [](char v) { return v != 0; });
  const double quiet_nan = std::numeric_limits<double>::quiet_NaN();
  return {out, nan ? quiet_nan : static_cast<double>(*std::min_element(lows.begin(), lows.end())),
          nan ? quiet_nan : static_cast<double>(*std::max_element(highs.begin(), highs.end()))};
}

}  // namespace vpns
