// Max pooling (float32, dilation 1, floor mode) for the sparse CPU engine. NCHW: the max over the
// window's rows first (contiguous, vectorised), then over its columns, one pass over the input and
// no padded copy. channels_last inputs give channels_last outputs, every channel of a pixel at once. Equal to
// torch.nn.functional.max_pool2d, NaN included (a window with a NaN gives NaN). Its plain-PyTorch reference is
// SeparableMaxPool2d.reference in vpns_fast/deploy/sparse_cpu.py. Why its own kernel: torch 2.14's eval-mode
// max_pool2d_with_indices took 3.4 ms on ResNet's stem (64x112x112, k3 s2 p1, batch 1, 2 threads); the torch expression
// of the separable max 0.87-0.99 ms, and at batch 32 it allocates a padded copy (106 MB) and four maxima (52 and 26
// MB): 111-131 ms against this kernel's 10 ms.
//
// The NCHW loop requests the lines ahead of its reads (vpns::read_ahead): its input, the stem's output, was just
// written by both cores, and lines in the other core's cache were not brought ahead by the hardware prefetchers (as for
// csrc/mean_pool.cpp). 2-vCPU Intel Xeon (AVX-512), 2 threads, ResNet's stem pooling (64 x 112 x 112, k3 s2 p1) on an
// input both threads had just written, medians of 40 / 10 calls, three processes each way (2026-12-07): batch 1
// 0.151-0.159 ms either way, batch 32 9.7-10.5 -> 6.2-7.7 ms; inside ResNet-50 at 10% kept, batch 1 (the call plan's
// step, bench.builds_ab, four processes each way) 0.204-0.228 -> 0.179-0.191 ms. The channels_last loop with the same
// requests ran 0.114-0.157 -> 0.179-0.184 ms at batch 1 and 10.2-11.8 -> 9.8-10.2 ms at batch 32: not kept there
// (bench/results/cpu-max-pool-prefetch-ab-2026-12-07-intel-xeon.txt).
#include "vpns_ops.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <limits>
#include <memory>

namespace {

// NaN-propagating max: once a NaN is in, it stays (v > NaN and NaN > v are both false).
inline float max_nan(float m, float v) { return (v > m || v != v) ? v : m; }

// acc[j] = max(acc[j], row[j]) for j < n
VPNS_AVX2_CLONES void max_into(float* __restrict acc, const float* __restrict row, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] = max_nan(acc[j], row[j]);
}

// out[j] = max(src[j], ..., src[j + k - 1]) for j < n: every horizontal window, contiguous (vectorised);
// strided outputs then pick every stride-th one.
VPNS_AVX2_CLONES void window_max(float* __restrict out, const float* __restrict src, int64_t n, int64_t k) {
  for (int64_t j = 0; j < n; ++j) out[j] = src[j];
  for (int64_t i = 1; i < k; ++i) {
    for (int64_t j = 0; j < n; ++j) out[j] = max_nan(out[j], src[j + i]);
  }
}

// out[j] = max(src[2j], src[2j + 1], src[2j + 2]) for j < n: the stride-2, 3-wide windows (ResNet's stem pooling)
// straight from the row, with no pass over every window first; with max_of_three for the rows, ResNet's stem pooling
// (64x112x112, k3 s2 p1, 2 threads, a 2-vCPU Zen 5 EPYC, medians of 300 calls, three processes each, 2026-12-06)
// took 0.052-0.054 ms at batch 1 against 0.137-0.167 ms, and 3.9-4.3 ms at batch 32 against 4.5-5.4 ms (there it
// reads 103 MB: memory traffic bounds it). Inside ResNet-18 at 10% kept, batch 1, the pooling's own time went from
// 0.185-0.223 to 0.166-0.174 ms: its input, the stem's output just written by both cores, is not in this core's cache.
VPNS_AVX2_CLONES void window_max_stride2_k3(float* __restrict out, const float* __restrict src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = max_nan(max_nan(src[2 * j], src[2 * j + 1]), src[2 * j + 2]);
}

// out[j] = max(a[j], b[j], c[j]) for j < n: three rows' column maxima in one pass.
VPNS_AVX2_CLONES void max_of_three(float* __restrict out, const float* __restrict a, const float* __restrict b,
                                   const float* __restrict c, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = max_nan(max_nan(a[j], b[j]), c[j]);
}

// out[j * channels + c] = max(out[j * channels + c], in[j * step + c]) for j < count, c < channels: one tap of
// a channels_last window over `count` consecutive outputs of a row (pixels `step` floats apart in the input).
VPNS_AVX2_CLONES void max_into_pixels(float* __restrict out, const float* __restrict in, int64_t count,
                                      int64_t channels, int64_t step) {
  for (int64_t j = 0; j < count; ++j) {
    float* o = out + j * channels;
    const float* x = in + j * step;
    for (int64_t c = 0; c < channels; ++c) o[c] = max_nan(o[c], x[c]);
  }
}

// Pooling of a channels_last input (the output of a DenseConv2d) into a channels_last output: each output row
// starts at -inf and takes the max of every valid tap, all channels of a pixel at once. ResNet's stem (k3 s2
// p1 on 64x112x112, 2 threads, 2-vCPU Intel Xeon, 2026-12-03, medians of 31 / 11 alternating calls): batch 1
// 0.119 ms against 0.184 ms for torch's channels_last pooling (no grad), batch 32 6.9 ms against 17.4 ms.
void max_pool_channels_last(const float* x, float* out, int64_t batch, int64_t channels, int64_t height, int64_t width,
                            int64_t out_h, int64_t out_w, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                            int64_t pw) {
  constexpr float lowest = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, batch * out_h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t n = item / out_h, oh = item % out_h;
      float* out_row = out + item * out_w * channels;
      std::fill(out_row, out_row + out_w * channels, lowest);
      const int64_t r0 = std::max<int64_t>(0, oh * sh - ph), r1 = std::min(height, oh * sh - ph + kh);
      for (int64_t r = r0; r < r1; ++r) {
        const float* in_row = x + (n * height + r) * width * channels;
        for (int64_t k = 0; k < kw; ++k) {
          // outputs whose tap k reads a column inside the input: ow * sw + k - pw in [0, width)
          const int64_t ow0 = std::max<int64_t>(0, (pw - k + sw - 1) / sw);
          // (a negative numerator would round towards zero: tap k of a narrow input reads no column at all)
          const int64_t last = width - 1 - k + pw;
          const int64_t ow1 = last < 0 ? 0 : std::min(out_w, last / sw + 1);
          if (ow0 >= ow1) continue;
          max_into_pixels(out_row + ow0 * channels, in_row + (ow0 * sw + k - pw) * channels, ow1 - ow0, channels,
                          sw * channels);
        }
      }
    }
  });
}

}  // namespace

namespace vpns {

at::Tensor max_pool2d(const at::Tensor& input, std::vector<int64_t> kernel_size, std::vector<int64_t> stride,
                      std::vector<int64_t> padding) {
  constexpr const char* op = "max_pool2d";
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == at::kFloat && input.dim() == 4, op,
              ": input must be a float32 CPU tensor [N, C, H, W], got ", input.scalar_type(), " ", input.sizes(),
              " on ", input.device());
  TORCH_CHECK(kernel_size.size() == 2 && stride.size() == 2 && padding.size() == 2, op,
              ": kernel_size, stride and padding must have 2 elements each");
  const int64_t kh = kernel_size[0], kw = kernel_size[1], sh = stride[0], sw = stride[1];
  const int64_t ph = padding[0], pw = padding[1];
  TORCH_CHECK(kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1, op, ": kernel_size and stride must be >= 1");
  TORCH_CHECK(ph >= 0 && pw >= 0 && 2 * ph <= kh && 2 * pw <= kw, op,
              ": padding must be >= 0 and at most half the kernel size, got (", ph, ", ", pw, ")");
  const int64_t batch = input.size(0), channels = input.size(1), height = input.size(2), width = input.size(3);
  TORCH_CHECK(channels >= 1 && height >= 1 && width >= 1, op, ": input channels, height and width must be >= 1, got ",
              channels, "x", height, "x", width);
  TORCH_CHECK(height + 2 * ph >= kh && width + 2 * pw >= kw, op, ": input ", height, "x", width,
              " is smaller than the kernel");
  const int64_t out_h = (height + 2 * ph - kh) / sh + 1, out_w = (width + 2 * pw - kw) / sw + 1;
  at::NoGradGuard no_grad;
  if (!input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    at::Tensor output = empty_activation({batch, channels, out_h, out_w}, at::MemoryFormat::ChannelsLast);
    if (output.numel() > 0) {
      max_pool_channels_last(input.const_data_ptr<float>(), output.mutable_data_ptr<float>(), batch, channels, height,
                             width, out_h, out_w, kh, kw, sh, sw, ph, pw);
    }
    return output;
  }
  const at::Tensor x = contiguous_activation(input);
  at::Tensor output = empty_activation({batch, channels, out_h, out_w});
  if (output.numel() == 0) return output;
  const float* x_data = x.const_data_ptr<float>();
  float* out_data = output.mutable_data_ptr<float>();
  constexpr float lowest = -std::numeric_limits<float>::infinity();
  const int64_t windows = (out_w - 1) * sw + 1;  // horizontal window starts up to the last output's
  at::parallel_for(0, batch * channels, 1, [&](int64_t begin, int64_t end) {
    // One input row's width of column maxima, padded by pw on both sides with -inf, and its window maxima.
    const std::unique_ptr<float[]> rows(new float[static_cast<size_t>(width + 2 * pw + windows)]);
    float* padded = rows.get();
    float* row_max = padded + pw;
    float* window = padded + width + 2 * pw;
    std::fill(padded, padded + pw, lowest);
    std::fill(row_max + width, row_max + width + pw, lowest);
    const float* share_end = x_data + end * height * width;
    const float* requested = x_data + begin * height * width;
    for (int64_t plane = begin; plane < end; ++plane) {
      const float* x_plane = x_data + plane * height * width;
      float* out_plane = out_data + plane * out_h * out_w;
      for (int64_t oh = 0; oh < out_h; ++oh) {
        const int64_t r0 = std::max<int64_t>(0, oh * sh - ph), r1 = std::min(height, oh * sh - ph + kh);
        // the lines up to kReadAheadFloats past the last input row this output row reads (why: the header)
        read_ahead(requested, x_plane + r1 * width, share_end);
        if (r1 - r0 == 3) {
          max_of_three(row_max, x_plane + r0 * width, x_plane + (r0 + 1) * width, x_plane + (r0 + 2) * width, width);
        } else {
          std::copy(x_plane + r0 * width, x_plane + (r0 + 1) * width, row_max);
          for (int64_t r = r0 + 1; r < r1; ++r) max_into(row_max, x_plane + r * width, width);
        }
        float* out_row = out_plane + oh * out_w;
        if (sw == 2 && kw == 3) {
          window_max_stride2_k3(out_row, padded, out_w);
        } else if (sw == 1) {
          window_max(out_row, padded, out_w, kw);
        } else {
          window_max(window, padded, windows, kw);
          for (int64_t ow = 0; ow < out_w; ++ow) out_row[ow] = window[ow * sw];
        }
      }
    }
  });
  return output;
}

}  // namespace vpns
