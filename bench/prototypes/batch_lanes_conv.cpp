// A prototype, not part of the engine: a sparse 3x3 convolution (stride 1 or 2, padding 1) over a batch of 32
// images held with the batch in the vector lanes, timed as a whole layer on one thread against nothing but itself;
// bench/prototypes/README.md says how its figures were set against the engine's layers. Layout: x[N][C][H][W] (the
// engine's NCHW) is copied per call into lanes[N/16][C][H+2][W+2][16] (16 images a 64-byte vector, zero border),
// so every tap of every output position is one aligned vector load; a tile is up to 14 output positions (a run of
// one output row, or two rows of 7) x 16 images, its 14 accumulators in registers; the nonzeros of a row of output
// channels are grouped by blocks of input channels as the engine groups them (block-major). The epilogue adds the
// bias, applies ReLU and writes NCHW through 16x16 transposes. Checked against a plain reference before timing.
//   g++ -O3 -mavx512f -fopenmp -o /tmp/batch_lanes_conv bench/prototypes/batch_lanes_conv.cpp
//   /tmp/batch_lanes_conv C_IN C_OUT H STRIDE [DENSITY=0.1] [CHANNEL_BLOCK=16] [ROW_BLOCK=64]
#include <immintrin.h>
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "../../csrc/lanes_transpose.h"

using vpns::lanes::transpose16;

constexpr int kBatch = 32, kLanes = 16, kMaxTile = 14;

static float* aligned(size_t floats) {
  float* p = static_cast<float*>(aligned_alloc(64, (floats * 4 + 63) / 64 * 64));
  std::memset(p, 0, floats * 4);
  return p;
}

struct Layer {
  int cin, cout, h, w, stride, oh, ow, hp, wp;
};

// x (NCHW) -> lanes, one group of 16 images
static void to_lanes(const Layer& L, const float* x, float* lanes) {
  for (int g = 0; g < kBatch / kLanes; ++g) {
    for (int c = 0; c < L.cin; ++c) {
      float* plane = lanes + ((size_t)g * L.cin + c) * L.hp * L.wp * kLanes;
      for (int h = 0; h < L.h; ++h) {
        for (int w0 = 0; w0 < L.w; w0 += 16) {
          const int n = std::min(16, L.w - w0);
          const __mmask16 m = (__mmask16)((1u << n) - 1u);
          __m512 r[16];
          for (int i = 0; i < 16; ++i)
            r[i] = _mm512_maskz_loadu_ps(m, x + (((size_t)(g * kLanes + i) * L.cin + c) * L.h + h) * L.w + w0);
          transpose16(r);
          float* dst = plane + ((size_t)(h + 1) * L.wp + (w0 + 1)) * kLanes;
          for (int j = 0; j < n; ++j) _mm512_store_ps(dst + j * kLanes, r[j]);
        }
      }
    }
  }
}

struct Packed {
  std::vector<int64_t> seg;  // [blocks][rows] + 1, block-major
  std::vector<int32_t> off;
  std::vector<float> val;
  int blocks, block;
};

static Packed pack(const Layer& L, const std::vector<float>& weight, int block) {
  Packed p;
  p.block = block;
  p.blocks = (L.cin + block - 1) / block;
  p.seg.assign((size_t)p.blocks * L.cout + 1, 0);
  size_t k = 0;
  for (int j = 0; j < p.blocks; ++j)
    for (int o = 0; o < L.cout; ++o) {
      p.seg[(size_t)j * L.cout + o] = k;
      for (int c = j * block; c < std::min(L.cin, (j + 1) * block); ++c)
        for (int t = 0; t < 9; ++t) {
          const float v = weight[((size_t)o * L.cin + c) * 9 + t];
          if (v == 0.0f) continue;
          p.off.push_back((int32_t)(((size_t)c * L.hp * L.wp + (t / 3) * L.wp + t % 3) * kLanes));
          p.val.push_back(v);
          ++k;
        }
    }
  p.seg.back() = k;
  return p;
}

// NR output rows x NC output columns of 16 images each; S: stride (input columns between outputs).
template <int NR, int NC, int S, bool kFirst>
__attribute__((always_inline)) inline void tile(const float* src, int64_t row_pitch, const int32_t* off,
                                                const float* val, int64_t count, float* out) {
  __m512 acc[NR * NC];
#pragma GCC unroll 16
  for (int v = 0; v < NR * NC; ++v) acc[v] = kFirst ? _mm512_setzero_ps() : _mm512_load_ps(out + 16 * v);
  for (int64_t k = 0; k < count; ++k) {
    const float* p = src + off[k];
    const __m512 w = _mm512_set1_ps(val[k]);
#pragma GCC unroll 16
    for (int v = 0; v < NR * NC; ++v)
      acc[v] = _mm512_fmadd_ps(w, _mm512_load_ps(p + (v / NC) * row_pitch + (v % NC) * S * 16), acc[v]);
  }
#pragma GCC unroll 16
  for (int v = 0; v < NR * NC; ++v) _mm512_store_ps(out + 16 * v, acc[v]);
}

template <int NR, int NC, int S>
static void tile_rows(const Packed& p, int cout, int o0, int o1, const float* src, int64_t row_pitch, float* sums) {
  for (int j = 0; j < p.blocks; ++j)
    for (int o = o0; o < o1; ++o) {
      const size_t at = (size_t)j * cout + o;
      const int64_t s0 = p.seg[at], n = p.seg[at + 1] - s0;
      float* out = sums + (size_t)(o - o0) * kMaxTile * 16;
      if (j == 0)
        tile<NR, NC, S, true>(src, row_pitch, &p.off[s0], &p.val[s0], n, out);
      else if (n)
        tile<NR, NC, S, false>(src, row_pitch, &p.off[s0], &p.val[s0], n, out);
    }
}

// bias + ReLU, sums [row][position][16 images] -> y (NCHW), positions (oh0.., ow0..) NR x NC
static void epilogue(const Layer& L, int g, int o0, int o1, int oh0, int ow0, int nr, int nc, const float* sums,
                     const float* bias, float* y) {
  for (int o = o0; o < o1; ++o) {
    const float* s = sums + (size_t)(o - o0) * kMaxTile * 16;
    const __m512 b = _mm512_set1_ps(bias[o]), zero = _mm512_setzero_ps();
    for (int r = 0; r < nr; ++r) {
      __m512 v[16];
      for (int c = 0; c < 16; ++c) v[c] = c < nc ? _mm512_max_ps(_mm512_add_ps(_mm512_load_ps(s + (r * nc + c) * 16), b), zero) : zero;
      transpose16(v);  // v[i] = image i's nc outputs
      const __mmask16 m = (__mmask16)((1u << nc) - 1u);
      for (int i = 0; i < 16; ++i)
        _mm512_mask_storeu_ps(y + (((size_t)(g * kLanes + i) * L.cout + o) * L.oh + oh0 + r) * L.ow + ow0, m, v[i]);
    }
  }
}

template <int S>
static void conv_lanes(const Layer& L, const Packed& p, const float* lanes, const float* bias, float* y,
                       float* sums, int row_block) {
  const int64_t pitch = (int64_t)L.wp * 16 * S;  // one output row down
  for (int g = 0; g < kBatch / kLanes; ++g) {
    const float* base = lanes + (size_t)g * L.cin * L.hp * L.wp * kLanes;
    if (L.ow >= kMaxTile) {
      for (int oh = 0; oh < L.oh; ++oh)
        for (int ow = 0; ow < L.ow; ow += kMaxTile) {
          const int nc = std::min(kMaxTile, L.ow - ow);
          const float* src = base + ((size_t)oh * S * L.wp + ow * S) * kLanes;
          for (int o0 = 0; o0 < L.cout; o0 += row_block) {
            const int o1 = std::min(L.cout, o0 + row_block);
            if (nc == kMaxTile)
              tile_rows<1, kMaxTile, S>(p, L.cout, o0, o1, src, pitch, sums);
            else
              tile_rows<1, 14, S>(p, L.cout, o0, o1, src, pitch, sums);  // (56 and 28 are whole tiles here)
            epilogue(L, g, o0, o1, oh, ow, 1, nc, sums, bias, y);
          }
        }
    } else {  // 7x7 outputs: two rows of 7 a tile (the last one row)
      for (int oh = 0; oh < L.oh; oh += 2) {
        const int nr = std::min(2, L.oh - oh);
        const float* src = base + ((size_t)oh * S * L.wp) * kLanes;
        for (int o0 = 0; o0 < L.cout; o0 += row_block) {
          const int o1 = std::min(L.cout, o0 + row_block);
          if (nr == 2)
            tile_rows<2, 7, S>(p, L.cout, o0, o1, src, pitch, sums);
          else
            tile_rows<1, 7, S>(p, L.cout, o0, o1, src, pitch, sums);
          epilogue(L, g, o0, o1, oh, 0, nr, 7, sums, bias, y);
        }
      }
    }
  }
}

int main(int argc, char** argv) {
  if (argc < 5) {
    std::fprintf(stderr, "usage: %s C_IN C_OUT H STRIDE [DENSITY] [CHANNEL_BLOCK] [ROW_BLOCK]\n", argv[0]);
    return 2;
  }
  Layer L{std::atoi(argv[1]), std::atoi(argv[2]), std::atoi(argv[3]), std::atoi(argv[3]), std::atoi(argv[4])};
  const double density = argc > 5 ? std::atof(argv[5]) : 0.1;
  const int block = argc > 6 ? std::atoi(argv[6]) : 16, row_block = argc > 7 ? std::atoi(argv[7]) : 64;
  L.oh = (L.h + 2 - 3) / L.stride + 1;
  L.ow = L.oh;
  L.hp = L.h + 2 + 1;  // one more padded row: the last tile's taps stay inside
  L.wp = L.w + 2 + (L.stride == 2 ? 1 : 0);
  if ((L.ow >= kMaxTile && L.ow % kMaxTile) || (L.ow < kMaxTile && L.ow != 7)) {
    std::fprintf(stderr, "prototype: output width %d not handled (multiples of 14, or 7)\n", L.ow);
    return 2;
  }
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> uni(-1.0f, 1.0f);
  std::vector<float> weight((size_t)L.cout * L.cin * 9), bias(L.cout);
  for (auto& v : weight) v = (rng() % 1000 < density * 1000) ? uni(rng) : 0.0f;
  for (auto& v : bias) v = uni(rng) * 0.1f;
  const size_t xs = (size_t)kBatch * L.cin * L.h * L.w, ys = (size_t)kBatch * L.cout * L.oh * L.ow;
  float* x = aligned(xs);
  for (size_t i = 0; i < xs; ++i) x[i] = uni(rng);
  float* lanes = aligned((size_t)kBatch * L.cin * L.hp * L.wp + 64);
  float* y = aligned(ys);
  float* sums = aligned((size_t)row_block * kMaxTile * 16);
  const Packed p = pack(L, weight, block);

  auto layer = [&] {
    to_lanes(L, x, lanes);
    if (L.stride == 1)
      conv_lanes<1>(L, p, lanes, bias.data(), y, sums, row_block);
    else
      conv_lanes<2>(L, p, lanes, bias.data(), y, sums, row_block);
  };
  layer();
  // check a sample of outputs against a plain direct convolution (double sums)
  double worst = 0.0;
  std::uniform_int_distribution<size_t> pick(0, ys - 1);
  for (int s = 0; s < 2000; ++s) {
    const size_t i = pick(rng);
    const int ow = i % L.ow, oh = i / L.ow % L.oh, o = i / ((size_t)L.ow * L.oh) % L.cout,
              n = i / ((size_t)L.ow * L.oh * L.cout);
    double acc = bias[o];
    for (int c = 0; c < L.cin; ++c)
      for (int t = 0; t < 9; ++t) {
        const int ih = oh * L.stride + t / 3 - 1, iw = ow * L.stride + t % 3 - 1;
        if (ih < 0 || iw < 0 || ih >= L.h || iw >= L.w) continue;
        acc += (double)weight[((size_t)o * L.cin + c) * 9 + t] * x[(((size_t)n * L.cin + c) * L.h + ih) * L.w + iw];
      }
    worst = std::max(worst, std::fabs(std::max(acc, 0.0) - y[i]));
  }
  if (!(worst < 1e-3)) {
    std::fprintf(stderr, "prototype: outputs differ from the reference by %g\n", worst);
    return 1;
  }
  std::vector<double> ms;
  for (int r = 0; r < 9; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    layer();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  const auto t0 = std::chrono::steady_clock::now();
  for (int r = 0; r < 5; ++r) to_lanes(L, x, lanes);
  const double copy_ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / 5;
  std::printf("%d->%d 3x3 stride %d at %dx%d, batch %d, %.2f kept, blocks of %d channels, rows of %d: %.3f ms a layer "
              "(median of 9, one thread; of it the copy into lanes %.3f ms); max |error| %.1e over 2000 outputs\n",
              L.cin, L.cout, L.stride, L.h, L.w, kBatch, density, block, row_block, ms[4], copy_ms, worst);
  return 0;
}
