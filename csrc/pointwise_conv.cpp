// Dense 1x1, stride-1 convolution of channels_last (NHWC) float32 activations: the GEMM out[p, o] = act(bias[o] +
// sum_c x[p, c] * w[c, o] (+ residual[p, o])) over positions p, with a register tile of 6 positions x 16 output
// channels (12 AVX2 accumulators; per input channel two loads of the packed weight, six broadcasts, twelve FMAs) and
// the epilogue (residual, ReLU keeping NaN) applied to the tile before it is stored. The weight is packed once
// into panels of 16 output channels, [C_out / 16][C_in][16].
//
// Why: the engine runs the layers it keeps dense through oneDNN (vpns_fast.deploy.sparse_cpu.DenseConv2d), and its
// 1x1 convolutions ran at 84-164 GFLOP/s (ResNet-50's shapes, batch 1, the runs below), ONNX Runtime's (MLAS, NCHWc)
// faster: bench.ort_layers on ResNet-50 at 50% kept, batch 1, had each stride-1 1x1 conv 1.05-1.67x ONNX Runtime's
// time, the 3x3 convs 0.52-1.15x. This tile (109-191 GFLOP/s there),
// 2 threads, bias + residual + ReLU, one call each way a round in rotating order, two runs an hour apart
// (bench.pointwise_ab, bench/results/cpu-pointwise-ab-2026-12-05-amd.txt and -amd-b.txt; 2-core AMD EPYC, AVX2):
// ResNet-50's ten 1x1 shapes 1.08-1.38x oneDNN at batch 1 (e.g. 256 -> 1024 at 14x14 0.705 -> 0.594 ms), 0.93-1.29x
// at batch 32; ResNet-50 at 50% kept 1.064x and 1.068x at batch 1, 1.01x at batch 32. First tries,
// not kept: the accumulators as an array (GCC kept it on the stack, a store after every FMA: 33-64 GFLOP/s); rows
// cut in blocks of 48, which left one row alone at 7x7 (49 positions): 0.75x oneDNN there.
// Where the engine's kernels run AVX-512 (avx512_kernels_chosen), the tile is 6 positions x 32 output channels of
// 16-lane vectors (tile_wide). 2-vCPU AMD EPYC of family 0x1A (Zen 5), 2 threads, calls alternating in one process
// (bench/results/cpu-pointwise-avx512-ab-2026-12-05-amd-zen5-scratch.txt): ResNet-50's ten 1x1 shapes 1.56-1.90x the
// AVX2 tile at batch 1 (341-482 GFLOP/s; all but 64 -> 64 at 56x56 1.81-1.90x), 1.15-1.73x at batch 32. Measured
// alone on that CPU only: Intel CPUs with AVX-512 and Zen 5 laptop parts (documented to split 512-bit operations in
// halves) get this tile too, unmeasured; Zen 4 (which splits them too, and gets it since 2026-12-06) only within
// ResNet-50 at 50% kept, where every kernel switching to AVX-512 made the network 1.07-1.09x as fast at batch 1
// (README, the sparse kernel's instruction sets).
// Tried since, not kept (2-vCPU Intel Xeon, 2 threads, ResNet-50 at 50% kept, batch 1, each step timed inside the
// compiled call plan, the variants taking turns in one process; bench/results/cpu-tried-not-kept-2026-12-07-intel-
// xeon.txt): requesting the next panels of the weight into L2 while the current ones' tiles run, layer4's 1x1 layers
// (weights of 4 MiB, read once a call) 0.95-1.13x but layer1-3's 0.77-1.04x (their panels are in L2 already after
// the first block of rows), the steps' sum 37.84 -> 37.86 ms; tiles over blocks of 256 or 512 input channels (the
// sums kept in between), layer4's 1x1 steps 0.78-1.13x (in a run with the next change in the network too); dense KxK
// convolutions as this GEMM over each position's patch gathered into a buffer (im2col by blocks of 48 positions),
// alone 0.88-1.03x oneDNN on 3x3 and the 7x7 stem and 1.07-1.29x on stride-2 1x1, inside the network 0.81-0.97x but
// for one stride-2 1x1 (1.17x): oneDNN runs these shapes at this tile's rate or better, and in the network both run
// slower than alone (layer4's 3x3, 9 MiB of weight against 2 MiB of L2 a core: 1.0-1.24 ms alone, 1.4-2.1 in the call).
#include "vpns_ops.h"

#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace vpns {
namespace {

bool cpu_has_avx2_fma() {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

constexpr int64_t kPanel = kPanelWidth;  // output channels a packed panel holds (two AVX2 vectors)
constexpr int64_t kRows = 6;             // positions a register tile holds

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) inline void finish(float* c, int64_t ldc, const float* residual, int64_t ldr,
                                                       bool relu, int i, __m256 v0, __m256 v1) {
  if (residual) {
    v0 = _mm256_add_ps(v0, _mm256_loadu_ps(residual + i * ldr));
    v1 = _mm256_add_ps(v1, _mm256_loadu_ps(residual + i * ldr + 8));
  }
  if (relu) {  // max(0, v): NaN (the second operand) kept
    const __m256 zero = _mm256_setzero_ps();
    v0 = _mm256_max_ps(zero, v0);
    v1 = _mm256_max_ps(zero, v1);
  }
  _mm256_storeu_ps(c + i * ldc, v0);
  _mm256_storeu_ps(c + i * ldc + 8, v1);
}

// One position's row of the tile: its input value at one input channel times the panel's 16 weights.
__attribute__((target("avx2,fma"))) inline void row_fma(const float* a, __m256 b0, __m256 b1, __m256& c0, __m256& c1) {
  const __m256 av = _mm256_broadcast_ss(a);
  c0 = _mm256_fmadd_ps(av, b0, c0);
  c1 = _mm256_fmadd_ps(av, b1, c1);
}

// c and residual may be one tensor (pointwise_conv's into_residual): each value is read before it is written.
template <int kTileRows>
__attribute__((target("avx2,fma"))) inline void tile(const float* __restrict a, int64_t lda, const float* __restrict b,
                                                     int64_t k, float* c, int64_t ldc, const float* __restrict bias,
                                                     const float* residual, int64_t ldr, bool relu) {
  const __m256 bias0 = bias ? _mm256_loadu_ps(bias) : _mm256_setzero_ps();
  const __m256 bias1 = bias ? _mm256_loadu_ps(bias + 8) : _mm256_setzero_ps();
  // named accumulators: GCC kept an array of them on the stack, a store after every FMA
  __m256 c00 = bias0, c01 = bias1, c10 = bias0, c11 = bias1, c20 = bias0, c21 = bias1;
  __m256 c30 = bias0, c31 = bias1, c40 = bias0, c41 = bias1, c50 = bias0, c51 = bias1;
  const float* a0 = a;
  const float* a1 = a + lda;
  const float* a2 = a + 2 * lda;
  const float* a3 = a + 3 * lda;
  const float* a4 = a + 4 * lda;
  const float* a5 = a + 5 * lda;
  for (int64_t kk = 0; kk < k; ++kk) {
    // unaligned loads: a packed tensor the caller made need not start on 32 bytes (the aligned load faulted there)
    const __m256 b0 = _mm256_loadu_ps(b + kk * kPanel);
    const __m256 b1 = _mm256_loadu_ps(b + kk * kPanel + 8);
    row_fma(a0 + kk, b0, b1, c00, c01);
    if constexpr (kTileRows > 1) row_fma(a1 + kk, b0, b1, c10, c11);
    if constexpr (kTileRows > 2) row_fma(a2 + kk, b0, b1, c20, c21);
    if constexpr (kTileRows > 3) row_fma(a3 + kk, b0, b1, c30, c31);
    if constexpr (kTileRows > 4) row_fma(a4 + kk, b0, b1, c40, c41);
    if constexpr (kTileRows > 5) row_fma(a5 + kk, b0, b1, c50, c51);
  }
  finish(c, ldc, residual, ldr, relu, 0, c00, c01);
  if constexpr (kTileRows > 1) finish(c, ldc, residual, ldr, relu, 1, c10, c11);
  if constexpr (kTileRows > 2) finish(c, ldc, residual, ldr, relu, 2, c20, c21);
  if constexpr (kTileRows > 3) finish(c, ldc, residual, ldr, relu, 3, c30, c31);
  if constexpr (kTileRows > 4) finish(c, ldc, residual, ldr, relu, 4, c40, c41);
  if constexpr (kTileRows > 5) finish(c, ldc, residual, ldr, relu, 5, c50, c51);
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, float*, int64_t, const float*, const float*,
                        int64_t, bool);
constexpr TileFn kTiles[kRows + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};

// The same GEMM with 16-lane vectors, where the engine's kernels run AVX-512 (avx512_kernels_chosen): a tile of 6
// positions x 32 output channels, two packed panels side by side (12 zmm accumulators, per input channel two loads of
// the weight, six broadcasts, twelve FMAs), or x 16 for a group's odd last panel (6 accumulators).
// GCC 12's _mm512_max_ps passes _mm512_undefined_ps() as its unused merge source, which -Wmaybe-uninitialized reports
// at every use; nothing here is uninitialised (as in csrc/sparse_conv.cpp).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
template <int kPanels>
__attribute__((target("avx512f"))) inline void finish_wide(float* c, int64_t ldc, const float* residual, int64_t ldr,
                                                           bool relu, int i, __m512 v0, __m512 v1) {
  if (residual) {
    v0 = _mm512_add_ps(v0, _mm512_loadu_ps(residual + i * ldr));
    if constexpr (kPanels > 1) v1 = _mm512_add_ps(v1, _mm512_loadu_ps(residual + i * ldr + kPanel));
  }
  if (relu) {  // max(0, v): NaN (the second operand) kept
    const __m512 zero = _mm512_setzero_ps();
    v0 = _mm512_max_ps(zero, v0);
    if constexpr (kPanels > 1) v1 = _mm512_max_ps(zero, v1);
  }
  _mm512_storeu_ps(c + i * ldc, v0);
  if constexpr (kPanels > 1) _mm512_storeu_ps(c + i * ldc + kPanel, v1);
}

template <int kPanels>
__attribute__((target("avx512f"))) inline void row_fma_wide(const float* a, __m512 b0, __m512 b1, __m512& c0,
                                                            __m512& c1) {
  const __m512 av = _mm512_set1_ps(*a);
  c0 = _mm512_fmadd_ps(av, b0, c0);
  if constexpr (kPanels > 1) c1 = _mm512_fmadd_ps(av, b1, c1);
}

// b: the first panel ([C_in][16]); the second, with kPanels 2, follows it (panels are C_in x 16 floats apart).
template <int kTileRows, int kPanels>
__attribute__((target("avx512f"))) inline void tile_wide(const float* __restrict a, int64_t lda,
                                                         const float* __restrict b, int64_t k, float* c, int64_t ldc,
                                                         const float* __restrict bias, const float* residual,
                                                         int64_t ldr, bool relu) {
  const __m512 bias0 = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  const __m512 bias1 = bias && kPanels > 1 ? _mm512_loadu_ps(bias + kPanel) : _mm512_setzero_ps();
  __m512 c00 = bias0, c01 = bias1, c10 = bias0, c11 = bias1, c20 = bias0, c21 = bias1;
  __m512 c30 = bias0, c31 = bias1, c40 = bias0, c41 = bias1, c50 = bias0, c51 = bias1;
  const float* second = b + k * kPanel;
  for (int64_t kk = 0; kk < k; ++kk) {
    const __m512 b0 = _mm512_loadu_ps(b + kk * kPanel);
    const __m512 b1 = kPanels > 1 ? _mm512_loadu_ps(second + kk * kPanel) : b0;
    const float* column = a + kk;  // position r's input at this channel: column[r * lda]
    row_fma_wide<kPanels>(column, b0, b1, c00, c01);
    if constexpr (kTileRows > 1) row_fma_wide<kPanels>(column + lda, b0, b1, c10, c11);
    if constexpr (kTileRows > 2) row_fma_wide<kPanels>(column + 2 * lda, b0, b1, c20, c21);
    if constexpr (kTileRows > 3) row_fma_wide<kPanels>(column + 3 * lda, b0, b1, c30, c31);
    if constexpr (kTileRows > 4) row_fma_wide<kPanels>(column + 4 * lda, b0, b1, c40, c41);
    if constexpr (kTileRows > 5) row_fma_wide<kPanels>(column + 5 * lda, b0, b1, c50, c51);
  }
  finish_wide<kPanels>(c, ldc, residual, ldr, relu, 0, c00, c01);
  if constexpr (kTileRows > 1) finish_wide<kPanels>(c, ldc, residual, ldr, relu, 1, c10, c11);
  if constexpr (kTileRows > 2) finish_wide<kPanels>(c, ldc, residual, ldr, relu, 2, c20, c21);
  if constexpr (kTileRows > 3) finish_wide<kPanels>(c, ldc, residual, ldr, relu, 3, c30, c31);
  if constexpr (kTileRows > 4) finish_wide<kPanels>(c, ldc, residual, ldr, relu, 4, c40, c41);
  if constexpr (kTileRows > 5) finish_wide<kPanels>(c, ldc, residual, ldr, relu, 5, c50, c51);
}

// By panels (1 or 2), then rows.
constexpr TileFn kWideTiles[3][kRows + 1] = {
    {},
    {nullptr, tile_wide<1, 1>, tile_wide<2, 1>, tile_wide<3, 1>, tile_wide<4, 1>, tile_wide<5, 1>, tile_wide<6, 1>},
    {nullptr, tile_wide<1, 2>, tile_wide<2, 2>, tile_wide<3, 2>, tile_wide<4, 2>, tile_wide<5, 2>, tile_wide<6, 2>}};
#pragma GCC diagnostic pop
#endif

}  // namespace

bool pointwise_conv_supported() { return cpu_has_avx2_fma(); }

RowBlocks even_row_blocks(int64_t count) {
  // (count 10000: 205 blocks of 49, not 208 with the last three past the end)
  const int64_t blocks = std::max<int64_t>(1, count / 48);
  const int64_t rows = std::max<int64_t>(1, (count + blocks - 1) / blocks);
  return {rows, std::max<int64_t>(1, (count + rows - 1) / rows)};
}

void packed_panels_product(const float* a, int64_t rows, int64_t k, const float* panels, int64_t first_panel,
                           int64_t last_panel, float* c, int64_t ldc, const float* bias, const float* residual,
                           bool relu) {
#if defined(__x86_64__)
  TORCH_CHECK(cpu_has_avx2_fma(), "packed_panels_product: needs a CPU with AVX2 and FMA");
  if (rows <= 0) return;
  const bool wide = avx512_kernels_chosen();
  // tiles of as even a height as the rows allow (49 rows: 6,6,6,6,5,5,5,5,5, not eight of 6 and one of 1)
  const int64_t tiles = (rows + kRows - 1) / kRows, base = rows / tiles, taller = rows % tiles;
  for (int64_t j = first_panel; j < last_panel;) {
    const int64_t step = wide && j + 1 < last_panel ? 2 : 1;
    const TileFn* tiles_of = wide ? kWideTiles[step] : kTiles;
    for (int64_t t = 0, p = 0; t < tiles; ++t) {
      const int64_t height = base + (t < taller ? 1 : 0);
      tiles_of[height](a + p * k, k, panels + j * k * kPanel, k, c + p * ldc + j * kPanel, ldc,
                       bias ? bias + j * kPanel : nullptr, residual ? residual + p * ldc + j * kPanel : nullptr, ldc,
                       relu);
      p += height;
    }
    j += step;
  }
#else
  TORCH_CHECK(false, "packed_panels_product: needs an x86-64 CPU with AVX2 and FMA");
#endif
}

at::Tensor pointwise_conv_pack(const at::Tensor& weight) {
  constexpr const char* op = "pointwise_conv_pack";
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat, op,
              ": weight must be a float32 CPU tensor, got ", weight.scalar_type(), " on ", weight.device());
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1, op,
              ": weight must be [C_out, C_in, 1, 1], got ", weight.sizes());
  const int64_t out = weight.size(0), in = weight.size(1);
  TORCH_CHECK(out > 0 && out % kPanel == 0 && in > 0, op,
              ": C_out must be a positive multiple of 16 and C_in > 0, got ", weight.sizes());
  // a copy always (with one input channel the transposed view is contiguous already: it would be the weight itself)
  return weight.reshape({out / kPanel, kPanel, in}).transpose(1, 2).clone(at::MemoryFormat::Contiguous);
}

at::Tensor pointwise_conv(const at::Tensor& input, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                          const std::optional<at::Tensor>& residual, bool relu, bool into_residual) {
  constexpr const char* op = "pointwise_conv";
  TORCH_CHECK(cpu_has_avx2_fma(), op, ": needs a CPU with AVX2 and FMA (pointwise_conv_supported())");
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == at::kFloat && input.dim() == 4 &&
                  input.is_contiguous(at::MemoryFormat::ChannelsLast),
              op, ": input must be a 4-d float32 CPU tensor in channels_last, got ", input.scalar_type(), " ",
              input.sizes(), " strides ", input.strides());
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kFloat && packed.dim() == 3 &&
                  packed.size(2) == kPanel && packed.is_contiguous(),
              op, ": packed must come from pointwise_conv_pack ([C_out / 16, C_in, 16] float32), got ", packed.sizes());
  TORCH_CHECK(packed.size(1) == input.size(1), op, ": input has ", input.size(1), " channels, the weight expects ",
              packed.size(1));
  const int64_t out_channels = packed.size(0) * kPanel;
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->numel() == out_channels && bias->is_contiguous(),
                op, ": bias must be a contiguous float32 CPU tensor of ", out_channels, " values");
  }
  if (residual && residual->defined()) {
    TORCH_CHECK(residual->device().is_cpu() && residual->scalar_type() == at::kFloat, op,
                ": residual must be a float32 CPU tensor");
    TORCH_CHECK(residual->sizes() == at::IntArrayRef({input.size(0), out_channels, input.size(2), input.size(3)}), op,
                ": residual must have the output's shape [", input.size(0), ", ", out_channels, ", ", input.size(2),
                ", ", input.size(3), "], got ", residual->sizes());
  }
  at::NoGradGuard no_grad;
  const int64_t batch = input.size(0), in = input.size(1), h = input.size(2), w = input.size(3);
  const int64_t panels = packed.size(0), positions = batch * h * w;
  at::Tensor res;
  if (residual && residual->defined()) res = residual->contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(!into_residual || (res.defined() && res.is_same(*residual)), op,
              ": into_residual needs a channels_last residual to write into");
  // the output's first panels would be written over input channels that later panels still read
  TORCH_CHECK(!into_residual || at::get_overlap_status(input, *residual) == at::MemOverlapStatus::No, op,
              ": into_residual needs a residual that shares no memory with the input");
  // else from the engine's cache of touched buffers, as the sparse kernel's outputs (csrc/buffers.cpp): ResNet-50's
  // 64 -> 256 1x1 at 56x56, batch 32, faulted its 103 MB output in afresh on every call at 0.6x oneDNN's speed
  at::Tensor output =
      into_residual ? res : empty_activation({batch, out_channels, h, w}, at::MemoryFormat::ChannelsLast);
  if (output.numel() == 0) return output;
  const float* x = input.const_data_ptr<float>();
  const float* b = packed.const_data_ptr<float>();
  const float* bias_data = bias && bias->defined() ? bias->const_data_ptr<float>() : nullptr;
  const float* r = res.defined() ? res.const_data_ptr<float>() : nullptr;
  float* y = output.mutable_data_ptr<float>();
#if defined(__x86_64__)
  // Items of (block of about 48 positions) x (group of panels), at least 4 a thread where the panels allow: a block's
  // rows of x (48 x C_in floats) stay in L2 while the group's panels go by.
  const RowBlocks blocks = even_row_blocks(positions);
  const int64_t row_block = blocks.rows, row_blocks = blocks.count;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // the wide tiles take panels in pairs: groups of two at least where there are two
  const bool wide = avx512_kernels_chosen();
  const int64_t fewest = wide ? std::min<int64_t>(2, panels) : 1;
  int64_t panel_group = panels;
  while (panel_group > fewest && row_blocks * ((panels + panel_group - 1) / panel_group) < 4 * threads) {
    panel_group = std::max(fewest, panel_group / 2);
  }
  const int64_t groups = (panels + panel_group - 1) / panel_group;
  at::parallel_for(0, row_blocks * groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t rb = item / groups, g = item % groups;
      const int64_t p0 = rb * row_block, p1 = std::min(positions, p0 + row_block);
      packed_panels_product(x + p0 * in, p1 - p0, in, b, g * panel_group, std::min(panels, (g + 1) * panel_group),
                            y + p0 * out_channels, out_channels, bias_data, r ? r + p0 * out_channels : nullptr, relu);
    }
  });
#endif
  return output;
}

// Dense linear layer for a few input rows: out[b, o] = bias[o] + sum_i x[b, i] * w[o, i], each thread taking a
// contiguous share of the output features and reading its rows of the weight once for every input row. Why: at batch
// 1 torch's linear ran ResNet-50's 2048 -> 1000 classifier (8 MB) at 0.103 ms warm and 0.376 ms with the caches
// flushed, this kernel at 0.048 and 0.166 ms (2-vCPU Zen 5, 2 threads, medians of 60 calls, 2026-12-06,
// bench/results/cpu-dense-linear-ab-2026-12-06-amd.txt); inside the network the classifier comes after the
// convolutions' weights, so its own is cold. 16 lanes where the engine's kernels run AVX-512, else 8.
#if defined(__x86_64__)
__attribute__((target("avx512f"))) inline float dot_avx512(const float* __restrict w, const float* __restrict x,
                                                           int64_t k) {
  __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 64 <= k; i += 64) {
    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
  }
  for (; i + 16 <= k; i += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
  if (i < k) {
    const __mmask16 rest = static_cast<__mmask16>((1u << (k - i)) - 1u);
    a1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(rest, w + i), _mm512_maskz_loadu_ps(rest, x + i), a1);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

__attribute__((target("avx2,fma"))) inline float dot_avx2(const float* __restrict w, const float* __restrict x,
                                                          int64_t k) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= k; i += 32) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  const __m256 sum = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, sum);
  float total = ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
  for (; i < k; ++i) total += w[i] * x[i];
  return total;
}
#endif

at::Tensor dense_linear(const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "dense_linear";
#if defined(__x86_64__)
  TORCH_CHECK(cpu_has_avx2_fma(), op, ": needs a CPU with AVX2 and FMA (pointwise_conv_supported())");
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == at::kFloat && input.dim() == 2, op,
              ": input must be a 2-d float32 CPU tensor [rows, in_features], got ", input.scalar_type(), " ",
              input.sizes(), " on ", input.device());
  TORCH_CHECK(weight.device().is_cpu() && weight.scalar_type() == at::kFloat && weight.dim() == 2 &&
                  weight.size(1) == input.size(1),
              op, ": weight must be a float32 CPU tensor [out_features, ", input.size(1), "], got ",
              weight.scalar_type(), " ", weight.sizes());
  const int64_t rows = input.size(0), k = input.size(1), n = weight.size(0);
  TORCH_CHECK(
      !bias || !bias->defined() ||
          (bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == n),
      op, ": bias must be a float32 CPU tensor [", n, "] or None");
  at::NoGradGuard no_grad;
  const at::Tensor x = input.contiguous(), w = weight.contiguous();
  const at::Tensor b = bias && bias->defined() ? bias->contiguous() : at::Tensor();
  at::Tensor output = at::empty({rows, n}, input.options());
  if (output.numel() == 0) return output;
  const float* xp = x.const_data_ptr<float>();
  const float* wp = w.const_data_ptr<float>();
  const float* bp = b.defined() ? b.const_data_ptr<float>() : nullptr;
  float* yp = output.mutable_data_ptr<float>();
  const bool wide = avx512_kernels_chosen();
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, threads, 1, [&](int64_t first, int64_t last) {
    for (int64_t t = first; t < last; ++t) {
      for (int64_t o = n * t / threads; o < n * (t + 1) / threads; ++o) {
        for (int64_t r = 0; r < rows; ++r) {
          const float dot = wide ? dot_avx512(wp + o * k, xp + r * k, k) : dot_avx2(wp + o * k, xp + r * k, k);
          yp[r * n + o] = dot + (bp ? bp[o] : 0.0f);
        }
      }
    }
  });
  return output;
#else
  TORCH_CHECK(false, op, ": needs an x86-64 CPU with AVX2 and FMA");
#endif
}

}  // namespace vpns
