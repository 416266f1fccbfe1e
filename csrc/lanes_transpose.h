// The 16x16 transpose of 16 zmm rows that the batch-in-lanes kernels (csrc/batch_lanes.cpp, generated_conv.cpp) use to
// move 16 images' rows into the lanes (into_lanes) and back (from_lanes); also included by its stand-alone prototype
// (bench/prototypes/batch_lanes_conv.cpp). x86-64 with GCC or Clang only (the includer checks).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace vpns::lanes {

// r[i][j] becomes r[j][i]: unpacks of pairs, then 128-bit lane shuffles of quads and octets.
__attribute__((target("avx512f"), always_inline)) inline void transpose16(__m512 r[16]) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int i = 0; i < 16; i += 8) {
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_f32x4(r[i + j], r[i + j + 4], 0xDD);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_f32x4(t[j], t[j + 8], 0xDD);
  }
}

// n <= 16 consecutive floats of 16 images (image i's at first + i * image_stride) into n vectors of 16 lanes at dst
// (64-byte aligned, one vector a position): the copy into the lanes of csrc/batch_lanes.cpp and
// csrc/generated_conv.cpp.
__attribute__((target("avx512f"), always_inline)) inline void into_lanes(const float* first, int64_t image_stride,
                                                                         int64_t n, float* dst) {
  const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
  __m512 r[16];
  for (int64_t i = 0; i < 16; ++i) r[i] = _mm512_maskz_loadu_ps(mask, first + i * image_stride);
  transpose16(r);
  for (int64_t j = 0; j < n; ++j) _mm512_store_ps(dst + j * 16, r[j]);
}

// The inverse of into_lanes with the epilogue of a convolution: n <= 16 vectors of 16 images' sums at sums (64-byte
// aligned, one vector a position) out to n consecutive floats of each image (image i's at out + i * image_stride), each
// as sparse_conv2d's epilogue makes it: (sum + bias) (+ residual, image i's at residual + i * residual_stride), then
// value < 0 ? 0 : value where relu (NaN and -0 kept). The epilogue of csrc/batch_lanes.cpp and
// csrc/generated_conv.cpp.
__attribute__((target("avx512f"), always_inline)) inline void from_lanes(const float* sums, int64_t n, float bias,
                                                                         const float* residual, int64_t residual_stride,
                                                                         bool relu, float* out, int64_t image_stride) {
  const __mmask16 mask = static_cast<__mmask16>((1u << n) - 1u);
  const __m512 zero = _mm512_setzero_ps(), add = _mm512_set1_ps(bias);
  __m512 v[16];
  for (int64_t j = 0; j < 16; ++j) v[j] = j < n ? _mm512_load_ps(sums + j * 16) : zero;
  transpose16(v);  // v[i]: image i's sums along the positions
  for (int64_t i = 0; i < 16; ++i) {
    __m512 value = _mm512_add_ps(v[i], add);
    if (residual) value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, residual + i * residual_stride));
    if (relu) value = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(value, zero, _CMP_LT_OQ), value, zero);
    _mm512_mask_storeu_ps(out + i * image_stride, mask, value);
  }
}

}  // namespace vpns::lanes
