// Max pooling (NCHW float32, dilation 1, floor mode) for the sparse CPU engine: the max over the
// window's rows first (contiguous, vectorised), then over its columns, one pass over the input and
// no padded copy. Equal to torch.nn.functional.max_pool2d, NaN included (a window with a NaN gives
// NaN). Its plain-PyTorch reference is SeparableMaxPool2d.reference in vpns_fast/deploy/sparse_cpu.py.
// Why its own kernel: torch 2.14's eval-mode max_pool2d_with_indices took 3.4 ms on ResNet's stem
// (64x112x112, k3 s2 p1, batch 1, 2 threads); the torch expression of the separable max 0.87-0.99 ms,
// and at batch 32 it allocates a padded copy (106 MB) and four maxima (52 and 26 MB): 111-131 ms
// against this kernel's 10 ms.
#include "vpns_ops.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <limits>
#include <memory>

namespace {

// NaN-propagating max: once a NaN is in, it stays (v > NaN and NaN > v are both false).
inline float max_nan(float m, float v) { return (v > m || v != v) ? v : m; }

// The row loops, cloned for AVX2 and the baseline ISA (chosen at load time): the baseline build is SSE2.
#if defined(__x86_64__) && defined(__GNUC__)
#define VPNS_ROW_LOOP __attribute__((target_clones("avx2", "default")))
#else
#define VPNS_ROW_LOOP
#endif

// acc[j] = max(acc[j], row[j]) for j < n
VPNS_ROW_LOOP void max_into(float* __restrict acc, const float* __restrict row, int64_t n) {
  for (int64_t j = 0; j < n; ++j) acc[j] = max_nan(acc[j], row[j]);
}

// out[j] = max(src[j], ..., src[j + k - 1]) for j < n: every horizontal window, contiguous (vectorised);
// strided outputs then pick every stride-th one.
VPNS_ROW_LOOP void window_max(float* __restrict out, const float* __restrict src, int64_t n, int64_t k) {
  for (int64_t j = 0; j < n; ++j) out[j] = src[j];
  for (int64_t i = 1; i < k; ++i) {
    for (int64_t j = 0; j < n; ++j) out[j] = max_nan(out[j], src[j + i]);
  }
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
  TORCH_CHECK(height >= 1 && width >= 1, op, ": input height and width must be >= 1, got ", height, "x", width);
  TORCH_CHECK(height + 2 * ph >= kh && width + 2 * pw >= kw, op, ": input ", height, "x", width,
              " is smaller than the kernel");
  const int64_t out_h = (height + 2 * ph - kh) / sh + 1, out_w = (width + 2 * pw - kw) / sw + 1;
  at::NoGradGuard no_grad;
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
    for (int64_t plane = begin; plane < end; ++plane) {
      const float* x_plane = x_data + plane * height * width;
      float* out_plane = out_data + plane * out_h * out_w;
      for (int64_t oh = 0; oh < out_h; ++oh) {
        const int64_t r0 = std::max<int64_t>(0, oh * sh - ph), r1 = std::min(height, oh * sh - ph + kh);
        std::copy(x_plane + r0 * width, x_plane + (r0 + 1) * width, row_max);
        for (int64_t r = r0 + 1; r < r1; ++r) max_into(row_max, x_plane + r * width, width);
        float* out_row = out_plane + oh * out_w;
        if (sw == 1) {
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
