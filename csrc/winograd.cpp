// Dense 3x3 convolution (stride 1, dilation 1, groups 1, zero padding) by Winograd's minimal filtering
// F(4x4, 3x3) for the CPU engine's dense layers: each 6x6 input tile and 3x3 filter go to a 36-point transform
// domain, where the convolution is 36 independent matrix products (tiles x C_in times C_in x C_out), and each
// product's 6x6 result comes back as a 4x4 output tile: 36 multiplies per 16 outputs and input channel instead
// of 144. The products run through the engine's dense 1x1 tile (vpns::packed_panels_product, csrc/pointwise_conv.cpp)
// when the weight comes in its packed panels, [36, C_out / 16, C_in, 16] (winograd_panels), else through torch's
// batched sgemm ([36, C_in, C_out], winograd_weight). The filters are transformed once, in float64, by
// vpns_fast.deploy.winograd.winograd_weight (next to this kernel's plain-PyTorch reference,
// winograd_conv2d_reference, with the same tiles and transforms). Inputs and outputs are channels_last, so every
// transform runs along contiguous channels (vectorised).
//
// Why: at half the weights kept the engine runs ResNet's convolutions dense, and oneDNN's direct convolution was
// as fast as ONNX Runtime's, so the network could not be faster. The products alone, measured against oneDNN's
// whole 3x3 convolution (2 threads, 2-core AMD EPYC, 2026-12-04, medians of 30): batch 1, 64 channels at 56x56
// 0.32 against 1.05 ms, 128 at 28x28 0.33 against 1.01 ms, 256 at 14x14 0.48 against 0.96 ms, 512 at 7x7 1.97
// against 0.89 ms (the transformed filters, 4x the weight's size, are read for 4 tiles); batch 32 2.0-2.6x
// faster. The engine times both on each layer's real input and keeps the faster (``convert_for_cpu``).
//
// The panels, because torch's sgemm (MKL) ran at about half the 16-lane tile's rate on a 2-vCPU AMD EPYC of family
// 0x1A (Zen 5; 167-196 GFLOP/s on these products at batch 1 for 64-256 channels, 57 at 512). There, 2 threads, bias +
// ReLU, one call each a round (bench.winograd_ab --layers,
// bench/results/cpu-winograd-panels-ab-2026-12-05-amd-zen5-*.txt), the whole layer at batch 1 ran 1.75-2.37x as fast
// with the 16-lane panels as with the sgemm (64, 128, 256 channels at 56, 28, 14; 1.94x at 512 at 7x7), and 1.37-1.76x
// with the AVX2 tile (ratios of medians). Intel CPUs unmeasured; on Zen 4 (whose default became AVX-512 on
// 2026-12-06) measured only within whole networks at 50% kept (README, the sparse kernel's instruction sets).
//
// Accuracy: the transforms' constants (up to 8 in the output transform, 1/24 in the filter's) make the float32
// result differ from the exact one by about 5e-6 of the output's largest magnitude, against 3e-7 for a direct
// convolution (random weights and inputs, 7-512 channels, 2026-12-04): well inside the engine's 1e-4 check,
// and the reason it can be switched off (``winograd=False``).
//
// Tiles go through in chunks (transform, products, inverse transform): the transformed chunk stays in cache
// between the three steps instead of going to memory and back at batch 32 (there the whole layer's transformed
// input is 58 MB for 64 channels at 56x56).
#include "activation.h"
#include "vpns_ops.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

using namespace vpns::epilogue;

constexpr int64_t kPoints = 36;        // 6 x 6 transform points
constexpr int64_t kChannelBlock = 64;  // channels a transform handles at once (its temporaries: 9 KiB)

// The transforms are plain loops over channels that the compiler vectorises: inlined (always_inline) into one copy
// built for AVX-512 and one for AVX2 (or none), chosen per call as the engine's other kernels are
// (avx512_kernels_chosen). 16-lane loops against 8-lane ones, 2 threads, the Zen 5 host, two builds in alternating
// processes, two sets of three pairs (bench/results/cpu-winograd-transforms-avx512-two-builds-2026-12-06-amd-zen5.txt):
// batch 1, 64 channels at 56x56 0.179-0.196 -> 0.168-0.174 ms, 128 at 28x28 0.148-0.159 -> 0.142-0.145 ms; batch 32
// (64, 128 and 256 channels) within the noise, 0.93-1.10x.
#if defined(__x86_64__) && defined(__GNUC__)
#define VPNS_WINOGRAD_LOOP __attribute__((always_inline)) inline
#define VPNS_WINOGRAD_AVX512 __attribute__((target("avx512f")))
#define VPNS_WINOGRAD_WIDE 1
#else
#define VPNS_WINOGRAD_LOOP inline
#define VPNS_WINOGRAD_WIDE 0
#endif

// B^T d B of one 6x6 input tile over `width` channels: rows[r][s] points at input pixel (r, s) of the tile (the
// shared zeros outside the input), dst at point 0 of the tile's column in the chunk's transformed input (point p
// `point_stride` floats further). B^T = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
// [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]].
VPNS_WINOGRAD_LOOP void input_tile(const float* const (&rows)[6][6], float* dst, int64_t point_stride, int64_t width) {
  float t[6][6][kChannelBlock], v[6][6][kChannelBlock];
  for (int s = 0; s < 6; ++s) {
    const float *d0 = rows[0][s], *d1 = rows[1][s], *d2 = rows[2][s], *d3 = rows[3][s], *d4 = rows[4][s],
                *d5 = rows[5][s];
    for (int64_t l = 0; l < width; ++l) {
      t[0][s][l] = 4.0f * d0[l] - 5.0f * d2[l] + d4[l];
      t[1][s][l] = -4.0f * (d1[l] + d2[l]) + d3[l] + d4[l];
      t[2][s][l] = 4.0f * (d1[l] - d2[l]) - d3[l] + d4[l];
      t[3][s][l] = 2.0f * (d3[l] - d1[l]) - d2[l] + d4[l];
      t[4][s][l] = 2.0f * (d1[l] - d3[l]) - d2[l] + d4[l];
      t[5][s][l] = 4.0f * d1[l] - 5.0f * d3[l] + d5[l];
    }
  }
  for (int i = 0; i < 6; ++i) {
    const float *u0 = t[i][0], *u1 = t[i][1], *u2 = t[i][2], *u3 = t[i][3], *u4 = t[i][4], *u5 = t[i][5];
    for (int64_t l = 0; l < width; ++l) {
      v[i][0][l] = 4.0f * u0[l] - 5.0f * u2[l] + u4[l];
      v[i][1][l] = -4.0f * (u1[l] + u2[l]) + u3[l] + u4[l];
      v[i][2][l] = 4.0f * (u1[l] - u2[l]) - u3[l] + u4[l];
      v[i][3][l] = 2.0f * (u3[l] - u1[l]) - u2[l] + u4[l];
      v[i][4][l] = 2.0f * (u1[l] - u3[l]) - u2[l] + u4[l];
      v[i][5][l] = 4.0f * u1[l] - 5.0f * u3[l] + u5[l];
    }
  }
  // written to the chunk from a local array: stored straight through dst with offsets, the loop above stayed
  // scalar (the compiler could not rule out overlaps)
  for (int p = 0; p < kPoints; ++p) std::memcpy(dst + p * point_stride, v[p / 6][p % 6], width * sizeof(float));
}

// A^T m A of one tile's 36 products over `width` output channels (point p at src + p * point_stride), plus the
// bias, plus the residual, then ReLU when `relu` (NaN kept, as torch.relu), into the output pixels out[a][b]
// (nullptr: outside the output, at its bottom or right edge). A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0],
// [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]].
VPNS_WINOGRAD_LOOP void output_tile(const float* src, int64_t point_stride, const float* bias,
                                    float* const (&out)[4][4], const float* const (&residual)[4][4], bool relu,
                                    int64_t width) {
  float t[4][6][kChannelBlock];
  for (int j = 0; j < 6; ++j) {
    const float *m0 = src + j * point_stride, *m1 = src + (6 + j) * point_stride, *m2 = src + (12 + j) * point_stride,
                *m3 = src + (18 + j) * point_stride, *m4 = src + (24 + j) * point_stride,
                *m5 = src + (30 + j) * point_stride;
    for (int64_t l = 0; l < width; ++l) {
      t[0][j][l] = m0[l] + m1[l] + m2[l] + m3[l] + m4[l];
      t[1][j][l] = m1[l] - m2[l] + 2.0f * (m3[l] - m4[l]);
      t[2][j][l] = m1[l] + m2[l] + 4.0f * (m3[l] + m4[l]);
      t[3][j][l] = m1[l] - m2[l] + 8.0f * (m3[l] - m4[l]) + m5[l];
    }
  }
  for (int a = 0; a < 4; ++a) {
    const float *u0 = t[a][0], *u1 = t[a][1], *u2 = t[a][2], *u3 = t[a][3], *u4 = t[a][4], *u5 = t[a][5];
    float y[4][kChannelBlock];
    for (int64_t l = 0; l < width; ++l) {
      y[0][l] = u0[l] + u1[l] + u2[l] + u3[l] + u4[l] + bias[l];
      y[1][l] = u1[l] - u2[l] + 2.0f * (u3[l] - u4[l]) + bias[l];
      y[2][l] = u1[l] + u2[l] + 4.0f * (u3[l] + u4[l]) + bias[l];
      y[3][l] = u1[l] - u2[l] + 8.0f * (u3[l] - u4[l]) + u5[l] + bias[l];
    }
    for (int b = 0; b < 4; ++b) {
      float* o = out[a][b];
      if (o == nullptr) continue;
      const float* r = residual[a][b];
      if (r != nullptr) {
        for (int64_t l = 0; l < width; ++l) y[b][l] += r[l];
      }
      if (relu) {
        for (int64_t l = 0; l < width; ++l) o[l] = activate<kRelu>(y[b][l]);
      } else {
        for (int64_t l = 0; l < width; ++l) o[l] = y[b][l];
      }
    }
  }
}

using InputTile = void (*)(const float* const (&)[6][6], float*, int64_t, int64_t);
using OutputTile = void (*)(const float*, int64_t, const float*, float* const (&)[4][4], const float* const (&)[4][4],
                            bool, int64_t);

// The two transforms compiled for one instruction set (`target`), named input_tile_<suffix> and output_tile_<suffix>.
#define VPNS_WINOGRAD_TRANSFORMS(suffix, target)                                                                      \
  target void input_tile_##suffix(const float* const(&rows)[6][6], float* dst, int64_t point_stride, int64_t width) { \
    input_tile(rows, dst, point_stride, width);                                                                       \
  }                                                                                                                   \
  target void output_tile_##suffix(const float* src, int64_t point_stride, const float* bias,                         \
                                   float* const(&out)[4][4], const float* const(&residual)[4][4], bool relu,          \
                                   int64_t width) {                                                                   \
    output_tile(src, point_stride, bias, out, residual, relu, width);                                                 \
  }

VPNS_WINOGRAD_TRANSFORMS(avx2, VPNS_AVX2_CLONES)
#if VPNS_WINOGRAD_WIDE
VPNS_WINOGRAD_TRANSFORMS(avx512, VPNS_WINOGRAD_AVX512)
#endif

// Tiles in a chunk: the chunk's transformed input and products (36 x (C_in + C_out) floats a tile) about
// kChunkBytes, or as large as the transformed weight where that is larger: every chunk reads the whole weight
// (4x the layer's), so a chunk smaller than it spends more time reading the weight than its own data.
// Batch 32, 2 threads, 2-core AMD EPYC, 2026-12-04, medians of 30, ms for chunks of 32 / 64 / 128 / 256 / 512 tiles:
// 64 channels at 56x56 21.1 / 18.1 / 16.1 / 16.1 / 16.2 (2 MiB: 113 tiles), 128 at 28x28 14.5 / 13.9 / 13.6 /
// 18.9 / 17.4 (2 MiB: 56 tiles, 13.6), 256 at 14x14 18.7 / 17.7 / 17.7 / 18.1 / 17.6, 512 at 7x7 (its 128 tiles)
// 30.3 / 21.3 / 19.3 / 19.3 / 19.5 (2 MiB: 14 tiles, 40.6).
constexpr int64_t kChunkBytes = int64_t{2} << 20;

// The chunk's 36 products through the engine's 1x1 tile (vpns::packed_panels_product): point p's `count` rows of
// the transformed input (v + p * chunk * channels) times its panels, into products + p * chunk * out_channels.
// Items of (point, block of about 48 rows): every point's products at once, not 36 parallel calls one after another.
void panel_products(const float* v, int64_t chunk, int64_t count, int64_t channels, const float* weight,
                    int64_t panel_count, float* products) {
  const int64_t out_channels = panel_count * vpns::kPanelWidth;
  const vpns::RowBlocks blocks = vpns::even_row_blocks(count);
  const int64_t row_block = blocks.rows, row_blocks = blocks.count;
  at::parallel_for(0, kPoints * row_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t p = item / row_blocks, r0 = item % row_blocks * row_block;
      const int64_t rows = std::min(count, r0 + row_block) - r0;
      vpns::packed_panels_product(v + (p * chunk + r0) * channels, rows, channels,
                                  weight + p * panel_count * channels * vpns::kPanelWidth, 0, panel_count,
                                  products + (p * chunk + r0) * out_channels, out_channels, nullptr, nullptr, false);
    }
  });
}

}  // namespace

namespace vpns {

at::Tensor winograd_conv2d(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                           std::vector<int64_t> padding, const std::optional<at::Tensor>& residual, int64_t activation,
                           int64_t chunk_tiles) {
  TORCH_CHECK(!at::GradMode::is_enabled() || !(input.requires_grad() || (residual.has_value() && residual->defined() &&
                                                                         residual->requires_grad())),
              "winograd_conv2d has no gradient; call it under torch.no_grad()");
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == at::kFloat && input.dim() == 4,
              "winograd_conv2d: input must be a 4-d float32 CPU tensor, got ", input.scalar_type(), " ", input.sizes());
  // [36, C_in, C_out] (torch's batched product) or [36, C_out / 16, C_in, 16] (the engine's packed panels)
  const bool panels = weight.dim() == 4;
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat &&
                  (weight.dim() == 3 || (panels && weight.size(3) == vpns::kPanelWidth)) && weight.size(0) == kPoints &&
                  weight.is_contiguous(),
              "winograd_conv2d: weight must be the contiguous float32 [36, C_in, C_out] of winograd_weight or the "
              "[36, C_out / 16, C_in, 16] of winograd_panels, got ",
              weight.sizes());
  TORCH_CHECK(!panels || pointwise_conv_supported(),
              "winograd_conv2d: packed panels need a CPU with AVX2 and FMA (pointwise_conv_supported())");
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0,
              "winograd_conv2d: padding must be 2 integers >= 0");
  TORCH_CHECK(activation == kIdentity || activation == kRelu,
              "winograd_conv2d: activation must be 0 (none) or 1 (relu), got ", activation);
  const int64_t batch = input.size(0), channels = input.size(1), height = input.size(2), width = input.size(3);
  const int64_t out_channels = panels ? weight.size(1) * vpns::kPanelWidth : weight.size(2);
  TORCH_CHECK(weight.size(panels ? 2 : 1) == channels, "winograd_conv2d: input has ", channels,
              " channels, the weight expects ", weight.size(panels ? 2 : 1));
  const int64_t pad_h = padding[0], pad_w = padding[1];
  const int64_t out_h = height + 2 * pad_h - 2, out_w = width + 2 * pad_w - 2;
  TORCH_CHECK(out_h >= 1 && out_w >= 1, "winograd_conv2d: input of size ", height, "x", width,
              " is smaller than the 3x3 kernel with padding ", pad_h, "x", pad_w);
  const at::Tensor x = input.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor b = bias.has_value() && bias->defined() ? bias->contiguous() : at::zeros({out_channels}, input.options());
  TORCH_CHECK(b.scalar_type() == at::kFloat && b.numel() == out_channels,
              "winograd_conv2d: bias must be float32 [C_out]");
  at::Tensor res;
  if (residual.has_value() && residual->defined()) {
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->device().is_cpu() &&
                    residual->sizes() == at::IntArrayRef({batch, out_channels, out_h, out_w}),
                "winograd_conv2d: residual must be float32 with the output's shape");
    res = residual->contiguous(at::MemoryFormat::ChannelsLast);
  }
  at::Tensor out = empty_activation({batch, out_channels, out_h, out_w}, at::MemoryFormat::ChannelsLast);

  const int64_t tiles_h = (out_h + 3) / 4, tiles_w = (out_w + 3) / 4, tiles = batch * tiles_h * tiles_w;
  const int64_t chunk_bytes = std::max<int64_t>(kChunkBytes, weight.numel() * 4);
  // (no channels at all: any chunk, and no division by zero)
  int64_t chunk =
      chunk_tiles > 0 ? chunk_tiles : chunk_bytes / (kPoints * 4 * std::max<int64_t>(1, channels + out_channels));
  chunk = std::max<int64_t>(1, std::min(chunk, tiles));
  at::Tensor transformed = empty_scratch({kPoints, chunk, channels});
  at::Tensor products = empty_scratch({kPoints, chunk, out_channels});
  const std::vector<float> zeros(static_cast<size_t>(std::max(channels, out_channels)), 0.0f);
  const float* src = x.data_ptr<float>();
  const float* bias_data = b.data_ptr<float>();
  const float* res_data = res.defined() ? res.data_ptr<float>() : nullptr;
  float* dst = out.data_ptr<float>();
  float* v = transformed.data_ptr<float>();
  InputTile transform_in = input_tile_avx2;
  OutputTile transform_out = output_tile_avx2;
#if VPNS_WINOGRAD_WIDE
  if (avx512_kernels_chosen()) {
    transform_in = input_tile_avx512;
    transform_out = output_tile_avx512;
  }
#endif
  const int64_t channel_blocks = (channels + kChannelBlock - 1) / kChannelBlock;
  const int64_t out_blocks = (out_channels + kChannelBlock - 1) / kChannelBlock;

  for (int64_t first = 0; first < tiles; first += chunk) {
    const int64_t count = std::min(chunk, tiles - first);
    // products of a shorter last chunk: views of the buffers' first `count` tiles of each point
    at::Tensor v_chunk = transformed, m_chunk = products;
    if (count < chunk) {
      v_chunk = transformed.narrow(1, 0, count);
      m_chunk = products.narrow(1, 0, count);
    }
    at::parallel_for(0, count * channel_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t local = item / channel_blocks, c0 = (item % channel_blocks) * kChannelBlock;
        const int64_t tile = first + local;
        const int64_t n = tile / (tiles_h * tiles_w), th = tile / tiles_w % tiles_h, tw = tile % tiles_w;
        const float* rows[6][6];
        for (int r = 0; r < 6; ++r) {
          const int64_t h = th * 4 - pad_h + r;
          for (int s = 0; s < 6; ++s) {
            const int64_t w = tw * 4 - pad_w + s;
            rows[r][s] = (h >= 0 && h < height && w >= 0 && w < width)
                             ? src + ((n * height + h) * width + w) * channels + c0
                             : zeros.data();
          }
        }
        transform_in(rows, v + local * channels + c0, chunk * channels, std::min(kChannelBlock, channels - c0));
      }
    });
    // point p's [count, C_in] times [C_in, C_out]
    if (panels) {
      panel_products(v, chunk, count, channels, weight.const_data_ptr<float>(), weight.size(1),
                     m_chunk.data_ptr<float>());
    } else {
      at::bmm_out(m_chunk, v_chunk, weight);
    }
    const float* products_data = m_chunk.data_ptr<float>();
    const int64_t point_stride = m_chunk.stride(0);
    at::parallel_for(0, count * out_blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t item = begin; item < end; ++item) {
        const int64_t local = item / out_blocks, k0 = (item % out_blocks) * kChannelBlock;
        const int64_t tile = first + local;
        const int64_t n = tile / (tiles_h * tiles_w), th = tile / tiles_w % tiles_h, tw = tile % tiles_w;
        float* pixels[4][4];
        const float* adds[4][4];
        for (int a = 0; a < 4; ++a) {
          for (int c = 0; c < 4; ++c) {
            const int64_t h = th * 4 + a, w = tw * 4 + c;
            const bool inside = h < out_h && w < out_w;
            const int64_t offset = ((n * out_h + h) * out_w + w) * out_channels + k0;
            pixels[a][c] = inside ? dst + offset : nullptr;
            adds[a][c] = inside && res_data != nullptr ? res_data + offset : nullptr;
          }
        }
        transform_out(products_data + local * out_channels + k0, point_stride, bias_data + k0, pixels, adds,
                      activation == kRelu, std::min(kChannelBlock, out_channels - k0));
      }
    });
  }
  return out;
}

}  // namespace vpns
