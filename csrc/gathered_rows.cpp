// The sparse linear layer's product for batches too small to fill a vector with images (batch < 8): each output
// is a dot product of its row's nonzeros with the input values they name, read by gathers (16 or 8 at a time).
//
// Why: the scalar loop before it (four chains of value * x[column], after a pass over every column index to check
// its range) took 0.179 ms for ResNet-50's classifier at 10% kept (2048 -> 1000, 204,800 nonzeros, batch 1, 2
// threads, warm caches, one process, medians of 400 calls) against 0.209 ms for the dense F.linear, and 0.50-0.55 ms
// inside the network (its compiled call plan's step; the weights come from L3 there). The range is now checked on
// the indices the loop already holds: each is clamped into [0, in_features) before it is read, so nothing outside
// x is read whatever the indices say, and any that was outside fails the call after the product. 2-vCPU Intel Xeon
// (AVX-512), 2026-12-07: the portable loop 0.103 ms, AVX2 gathers 0.039 ms, AVX-512 gathers 0.037 ms (at 50% kept
// 0.230 ms against dense 0.211, before 1.07 ms); inside ResNet-50 at 10% kept 0.50-0.55 -> 0.11-0.12 ms, 8 rounds of
// alternating processes against the previous build (bench.builds_ab,
// bench/results/cpu-gathered-rows-ab-2026-12-07-intel-xeon.txt), where the whole call's ratio, 1.008x (p20-p80
// 0.98-1.06x), is within the spread of the per-process layer choices. AVX2 gathers on AMD CPUs are not measured.
#include "vpns_ops.h"

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace vpns {
namespace {

// Four independent sums a row, as the loop before it (and the reference for the vector ones' tests).
bool rows_portable(const float* x, uint32_t last, const int64_t* row_ptr, const int32_t* columns, const float* values,
                   const float* bias, float* out, int64_t begin, int64_t end) {
  uint32_t outside = 0;
  auto read = [&](int64_t k) {
    const uint32_t column = static_cast<uint32_t>(columns[k]);  // a negative index is a large one here
    outside |= column > last;
    return values[k] * x[std::min(column, last)];
  };
  for (int64_t o = begin; o < end; ++o) {
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t k = row_ptr[o];
    for (; k + 4 <= row_ptr[o + 1]; k += 4) {
      s0 += read(k);
      s1 += read(k + 1);
      s2 += read(k + 2);
      s3 += read(k + 3);
    }
    for (; k < row_ptr[o + 1]; ++k) s0 += read(k);
    out[o] = (s0 + s1) + (s2 + s3) + (bias ? bias[o] : 0.0f);
  }
  return outside == 0;
}

#if defined(__x86_64__)
// AVX2 has no unsigned compare: an index is inside when clamping leaves it unchanged (inside's lanes stay all ones
// while every index seen was <= limit).
__attribute__((target("avx2"))) inline __m256i clamped(__m256i index, __m256i limit, __m256i& inside) {
  const __m256i kept = _mm256_min_epu32(index, limit);
  inside = _mm256_and_si256(inside, _mm256_cmpeq_epi32(kept, index));
  return kept;
}

__attribute__((target("avx2,fma"))) bool rows_avx2(const float* x, uint32_t last, const int64_t* row_ptr,
                                                   const int32_t* columns, const float* values, const float* bias,
                                                   float* out, int64_t begin, int64_t end) {
  const __m256i limit = _mm256_set1_epi32(static_cast<int32_t>(last));
  __m256i inside = _mm256_set1_epi32(-1);
  for (int64_t o = begin; o < end; ++o) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t k = row_ptr[o];
    const int64_t stop = row_ptr[o + 1];
    for (; k + 16 <= stop; k += 16) {
      const __m256i i0 = clamped(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(columns + k)), limit, inside);
      const __m256i i1 = clamped(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(columns + k + 8)), limit, inside);
      acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(values + k), _mm256_i32gather_ps(x, i0, 4), acc0);
      acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(values + k + 8), _mm256_i32gather_ps(x, i1, 4), acc1);
    }
    for (; k < stop; k += 8) {
      const int64_t left = std::min<int64_t>(8, stop - k);
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(left)), lane);
      // masked-off lanes load index 0 and value 0: inside, and gathered from x[0] not at all (the gather's mask)
      const __m256i index = clamped(_mm256_maskload_epi32(columns + k, mask), limit, inside);
      const __m256 gathered = _mm256_mask_i32gather_ps(_mm256_setzero_ps(), x, index, _mm256_castsi256_ps(mask), 4);
      acc0 = _mm256_fmadd_ps(_mm256_maskload_ps(values + k, mask), gathered, acc0);
    }
    const __m256 sum8 = _mm256_add_ps(acc0, acc1);
    __m128 sum4 = _mm_add_ps(_mm256_castps256_ps128(sum8), _mm256_extractf128_ps(sum8, 1));
    sum4 = _mm_add_ps(sum4, _mm_movehl_ps(sum4, sum4));
    sum4 = _mm_add_ss(sum4, _mm_movehdup_ps(sum4));
    out[o] = _mm_cvtss_f32(sum4) + (bias ? bias[o] : 0.0f);
  }
  return _mm256_movemask_epi8(inside) == -1;
}

__attribute__((target("avx512f"))) bool rows_avx512(const float* x, uint32_t last, const int64_t* row_ptr,
                                                    const int32_t* columns, const float* values, const float* bias,
                                                    float* out, int64_t begin, int64_t end) {
  const __m512i limit = _mm512_set1_epi32(static_cast<int32_t>(last));
  __mmask16 outside = 0;
  for (int64_t o = begin; o < end; ++o) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t k = row_ptr[o];
    const int64_t stop = row_ptr[o + 1];
    for (; k + 32 <= stop; k += 32) {
      const __m512i i0 = _mm512_loadu_si512(columns + k);
      const __m512i i1 = _mm512_loadu_si512(columns + k + 16);
      outside |= _mm512_cmpgt_epu32_mask(i0, limit) | _mm512_cmpgt_epu32_mask(i1, limit);
      acc0 = _mm512_fmadd_ps(_mm512_loadu_ps(values + k), _mm512_i32gather_ps(_mm512_min_epu32(i0, limit), x, 4), acc0);
      acc1 = _mm512_fmadd_ps(_mm512_loadu_ps(values + k + 16), _mm512_i32gather_ps(_mm512_min_epu32(i1, limit), x, 4),
                             acc1);
    }
    for (; k < stop; k += 16) {
      const __mmask16 mask = static_cast<__mmask16>(stop - k >= 16 ? 0xFFFF : (1u << (stop - k)) - 1);
      const __m512i index = _mm512_maskz_loadu_epi32(mask, columns + k);
      outside |= _mm512_mask_cmpgt_epu32_mask(mask, index, limit);
      const __m512 gathered = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), mask, _mm512_min_epu32(index, limit), x, 4);
      acc0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask, values + k), gathered, acc0);
    }
    out[o] = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + (bias ? bias[o] : 0.0f);
  }
  return outside == 0;
}
#endif

}  // namespace

bool gathered_row_products(const float* x, int64_t in_features, const int64_t* row_ptr, const int32_t* columns,
                           const float* values, const float* bias, float* out, int64_t begin, int64_t end,
                           int vector_width) {
  TORCH_CHECK(in_features >= 1 && in_features <= INT32_MAX,
              "gathered_row_products: in_features must be in [1, 2^31 - 1], got ", in_features);
  const uint32_t last = static_cast<uint32_t>(in_features - 1);
#if defined(__x86_64__)
  if (vector_width == 16) return rows_avx512(x, last, row_ptr, columns, values, bias, out, begin, end);
  if (vector_width == 8) return rows_avx2(x, last, row_ptr, columns, values, bias, out, begin, end);
#endif
  return rows_portable(x, last, row_ptr, columns, values, bias, out, begin, end);
}

}  // namespace vpns
