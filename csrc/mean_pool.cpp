// Global average pooling (the mean of each channel over its whole plane: AdaptiveAvgPool2d(1), the pooling before
// the classifier of ResNets, RegNets, MobileNets, EfficientNets) of float32 activations, NCHW or channels_last,
// for the sparse CPU engine. Its plain-PyTorch reference is GlobalAvgPool2d.reference in
// vpns_fast/deploy/sparse_cpu.py.
//
// Why its own kernel: inside ResNet-50 at batch 1 torch's adaptive_avg_pool2d took 0.15-0.30 ms on the last block's
// output (2048 x 7 x 7, 400 KB), 0.026 ms on the same tensor once read (a second pooling of it in the same
// call plan): its input was just written by both cores, half of it in the other core's cache, and the hardware
// prefetchers did not bring those lines ahead of the reads. This kernel requests the lines it reads next
// (vpns::read_ahead). 2-vCPU Intel Xeon (AVX-512), 2 threads, 10% kept, batch 1, the same deployed network
// with either pooling, 20 alternating rounds (bench.global_avg_pool_ab,
// bench/results/cpu-global-avg-pool-ab-2026-12-07-intel-xeon.txt): the step 0.174 -> 0.034 ms in ResNet-50 and
// 0.085 -> 0.011 ms in ResNet-18 (512 x 7 x 7); the whole call 1.004x (p20-p80 0.987-1.026x) and 1.028x
// (0.996-1.048x). Alone on a warm input 0.009 against 0.014 ms (2048 x 7 x 7).
#include "vpns_ops.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>

namespace {

// out[c] = sum(x[c * plane .. (c + 1) * plane)) * scale for c in [0, count): NCHW planes one after another. Each
// plane's sum in 8 lanes (j mod 8), then the lanes in a fixed tree and the tail in order: the same bits on any
// thread count.
VPNS_AVX2_CLONES void plane_means(const float* __restrict x, int64_t count, int64_t plane, float scale,
                                  float* __restrict out) {
  const float* end = x + count * plane;
  const float* requested = x;
  for (int64_t c = 0; c < count; ++c) {
    const float* p = x + c * plane;
    vpns::read_ahead(requested, p + plane, end);
    float lanes[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 8 <= plane; j += 8) {
      for (int l = 0; l < 8; ++l) lanes[l] += p[j + l];
    }
    float sum = ((lanes[0] + lanes[4]) + (lanes[2] + lanes[6])) + ((lanes[1] + lanes[5]) + (lanes[3] + lanes[7]));
    for (; j < plane; ++j) sum += p[j];
    out[c] = sum * scale;
  }
}

// Channels of a channels_last image a work item sums (1 KiB of each pixel's row: 16 lines).
constexpr int64_t kChannelChunk = 256;
// Pixels summed on their own before their sum joins the running one: in one running float the error grows with every
// pixel (an outside review found this loop's first version far less accurate than torch's mean at 112 x 112); in
// blocks it grows with the block and the block count. Measured since, as max |error| / max |mean| against float64:
// 4.7e-7 at 2 x 8 x 112 x 112 (torch 1.3e-7), 2.0-2.5e-7 on 7x7 planes (torch 1.3-2.0e-7)
// (bench/results/cpu-global-avg-pool-ab-2026-12-07-intel-xeon.txt).
constexpr int64_t kPixelBlock = 64;

// out[c] = sum over pixels p of x[p * row + c], times scale, for c in [0, count) (count <= kChannelChunk): a chunk
// of one channels_last image's channels, rows `row` floats apart. Pixels in blocks of kPixelBlock, each block's sums
// added to the running ones; the chunk's lines two pixels ahead requested as it goes.
VPNS_AVX2_CLONES void pixel_means(const float* __restrict x, int64_t pixels, int64_t row, int64_t count, float scale,
                                  float* __restrict out) {
  float total[kChannelChunk], block[kChannelChunk];
  std::fill(total, total + count, 0.0f);
  for (int64_t p0 = 0; p0 < pixels; p0 += kPixelBlock) {
    std::fill(block, block + count, 0.0f);
    for (int64_t p = p0; p < std::min(pixels, p0 + kPixelBlock); ++p) {
      const float* values = x + p * row;
      if (p + 2 < pixels) {
        for (int64_t c = 0; c < count; c += 16) __builtin_prefetch(values + 2 * row + c, 0, 3);
      }
      for (int64_t c = 0; c < count; ++c) block[c] += values[c];
    }
    for (int64_t c = 0; c < count; ++c) total[c] += block[c];
  }
  for (int64_t c = 0; c < count; ++c) out[c] = total[c] * scale;
}

}  // namespace

namespace vpns {

at::Tensor global_avg_pool2d(const at::Tensor& input) {
  constexpr const char* op = "global_avg_pool2d";
  TORCH_CHECK(input.defined() && input.device().is_cpu() && input.scalar_type() == at::kFloat && input.dim() == 4, op,
              ": input must be a 4-d float32 CPU tensor [N, C, H, W], got ", input.sizes(), " ", input.scalar_type());
  const bool channels_last = !input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(input.is_contiguous() || channels_last, op, ": input must be contiguous or channels_last");
  const int64_t batch = input.size(0), channels = input.size(1), plane = input.size(2) * input.size(3);
  TORCH_CHECK(plane > 0, op, ": input has an empty plane (", input.sizes(), ")");
  at::NoGradGuard no_grad;
  at::Tensor output = at::empty({batch, channels, 1, 1}, input.options());
  if (output.numel() == 0) return output;
  const float* x = input.const_data_ptr<float>();
  float* out = output.mutable_data_ptr<float>();
  // 1 / plane as torch computes the mean's scale (a float: sum * (1 / n) may differ from sum / n in the last bit)
  const float scale = 1.0f / static_cast<float>(plane);
  if (channels_last) {
    const int64_t chunks = (channels + kChannelChunk - 1) / kChannelChunk;
    at::parallel_for(0, batch * chunks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t n = item / chunks, c0 = item % chunks * kChannelChunk;
        pixel_means(x + n * plane * channels + c0, plane, channels, std::min(kChannelChunk, channels - c0), scale,
                    out + n * channels + c0);
      }
    });
    return output;
  }
  const int64_t grain = std::max<int64_t>(1, 4096 / plane);  // at least ~16 KB of input a thread
  at::parallel_for(0, batch * channels, grain, [&](int64_t begin, int64_t end) {
    plane_means(x + begin * plane, end - begin, plane, scale, out + begin);
  });
  return output;
}

}  // namespace vpns
