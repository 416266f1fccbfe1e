// The sums of a sparse 1x1 convolution at batch 32 in two layouts, one thread, to find what bounds the engine's
// 1x1 layers with small planes (ResNet-50's stage 4, 7x7): not part of vpns_fast, see README.md here.
//
// per-image: NCHW as the engine keeps it, a tile the image's whole plane (4 zmm vectors at 7x7: 49 of 64 lanes);
// lanes:     [N/16][C][H*W][16], a tile T positions of 16 images (T zmm vectors, every lane used).
// Both: weights CSR over output channels, cut into blocks of input channels (a block's window is read by every output
// channel while it is in L1); a row's partial sums are loaded and stored around each block, the first block starts
// them at zero. Options that isolate one cost each:
//   fixed-count: every (block, row) segment cut or padded to round(density * block) nonzeros (its FLOPs counted as
//                run): if the row loop's exit mispredicts cost much, this runs faster;
//   out-chunk K: the blocks looped inside chunks of K output channels, so a chunk's partial sums stay in L1/L2.
//
//   g++ -O3 -mavx512f -o /tmp/pointwise_sums_layouts bench/prototypes/pointwise_sums_layouts.cpp
//   /tmp/pointwise_sums_layouts C_IN C_OUT H [DENSITY]     # e.g. 512 2048 7
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

namespace {

constexpr int kBatch = 32;
constexpr int kLanes = 16;

struct Segments {  // the weights cut in blocks of input channels: segment (block b, row o) is ptr[b * rows + o] ..
  int blocks = 0;
  std::vector<int> ptr{0};
  std::vector<int> offset;  // floats from the tile's first input value
  std::vector<float> value;
};

struct Csr {
  std::vector<int> ptr{0}, column;
  std::vector<float> value;
};

Csr random_weights(int rows, int columns, double density) {
  std::mt19937 generator(1);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  Csr w;
  for (int o = 0; o < rows; ++o) {
    for (int c = 0; c < columns; ++c) {
      if (uniform(generator) < density) {
        w.column.push_back(c);
        w.value.push_back(uniform(generator) - 0.5f);
      }
    }
    w.ptr.push_back(static_cast<int>(w.column.size()));
  }
  return w;
}

Segments blocked(const Csr& w, int rows, int columns, int block, long channel_stride) {
  Segments s;
  s.blocks = (columns + block - 1) / block;
  for (int b = 0; b < s.blocks; ++b) {
    for (int o = 0; o < rows; ++o) {
      for (int j = w.ptr[o]; j < w.ptr[o + 1]; ++j) {
        if (w.column[j] / block == b) {
          s.offset.push_back(static_cast<int>(w.column[j] * channel_stride));
          s.value.push_back(w.value[j]);
        }
      }
      s.ptr.push_back(static_cast<int>(s.offset.size()));
    }
  }
  return s;
}

Segments fixed_count(const Segments& s, int count) {
  Segments f;
  f.blocks = s.blocks;
  for (size_t i = 0; i + 1 < s.ptr.size(); ++i) {
    for (int k = 0; k < count; ++k) {
      const bool real = s.ptr[i] + k < s.ptr[i + 1];
      f.offset.push_back(real ? s.offset[s.ptr[i] + k] : 0);
      f.value.push_back(real ? s.value[s.ptr[i] + k] : 0.0f);
    }
    f.ptr.push_back(static_cast<int>(f.offset.size()));
  }
  return f;
}

// One segment's FMAs into a tile of kVectors zmm sums; the last vector stored under store_mask.
template <int kVectors>
inline void segment(const float* x, const Segments& s, int i, float* sums, bool first, __mmask16 store_mask) {
  __m512 acc[kVectors];
  for (int k = 0; k < kVectors; ++k) acc[k] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(sums + kLanes * k);
  for (int j = s.ptr[i]; j < s.ptr[i + 1]; ++j) {
    const __m512 w = _mm512_set1_ps(s.value[j]);
    const float* in = x + s.offset[j];
    for (int k = 0; k < kVectors; ++k) acc[k] = _mm512_fmadd_ps(w, _mm512_loadu_ps(in + kLanes * k), acc[k]);
  }
  for (int k = 0; k + 1 < kVectors; ++k) _mm512_storeu_ps(sums + kLanes * k, acc[k]);
  _mm512_mask_storeu_ps(sums + kLanes * (kVectors - 1), store_mask, acc[kVectors - 1]);
}

// per-image at 7x7: sums of image n, row o at sums + (n * rows + o) * 64
void per_image(const float* x, float* sums, const Segments& s, int rows, int columns, int plane) {
  for (int n = 0; n < kBatch; ++n) {
    for (int b = 0; b < s.blocks; ++b) {
      for (int o = 0; o < rows; ++o) {
        segment<4>(x + static_cast<long>(n) * columns * plane, s, b * rows + o,
                   sums + (static_cast<long>(n) * rows + o) * 64, b == 0, 0xffff);
      }
    }
  }
}

template <int kT>
void lanes(const float* x, float* sums, const Segments& s, int rows, int columns, int plane, int out_chunk) {
  for (int g = 0; g < kBatch / kLanes; ++g) {
    const float* group = x + static_cast<long>(g) * columns * plane * kLanes;
    for (int t = 0; t < plane; t += kT) {
      for (int o0 = 0; o0 < rows; o0 += out_chunk) {
        for (int b = 0; b < s.blocks; ++b) {
          for (int o = o0; o < std::min(rows, o0 + out_chunk); ++o) {
            segment<kT>(group + t * kLanes, s, b * rows + o,
                        sums + ((static_cast<long>(g) * rows + o) * plane + t) * kLanes, b == 0, 0xffff);
          }
        }
      }
    }
  }
}

template <typename Fn>
double median_ms(Fn&& fn) {
  std::vector<double> ms;
  for (int r = 0; r < 9; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s C_IN C_OUT H [DENSITY]\n", argv[0]);
    return 2;
  }
  const int columns = std::atoi(argv[1]), rows = std::atoi(argv[2]), h = std::atoi(argv[3]);
  const double density = argc > 4 ? std::atof(argv[4]) : 0.1;
  const int plane = h * h;
  if (plane != 49) {
    std::fprintf(stderr, "H: only 7 (the 4-vector per-image tile) is written\n");
    return 2;
  }
  const Csr w = random_weights(rows, columns, density);
  const size_t inputs = static_cast<size_t>(kBatch) * columns * plane + 64;
  std::vector<float> x_storage(inputs + 16), sums_storage(static_cast<size_t>(kBatch) * rows * 64 + 16);
  float* x = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(x_storage.data()) + 63) & ~uintptr_t{63});
  float* sums = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(sums_storage.data()) + 63) & ~uintptr_t{63});
  for (size_t i = 0; i < inputs; ++i) x[i] = static_cast<float>(i % 97) * 0.01f;
  const double flop = 2.0 * w.column.size() * kBatch * plane;  // lanes counted: only the used ones
  std::printf("# %d -> %d at %dx%d, batch %d, %.3g kept, one thread; GFLOP/s on the nonzeros\n", columns, rows, h, h,
              kBatch, density);
  for (int block : {64, 128, 256, 1 << 30}) {
    const Segments s = blocked(w, rows, columns, block, plane);
    const double ms = median_ms([&] { per_image(x, sums, s, rows, columns, plane); });
    std::printf("per-image, 4 vectors, block %5d: %6.2f ms %6.1f GFLOP/s\n", std::min(block, columns), ms, flop / ms / 1e6);
  }
  for (int block : {16, 32, 64, 128, 1 << 30}) {
    const Segments s = blocked(w, rows, columns, block, static_cast<long>(plane) * kLanes);
    const double ms = median_ms([&] { lanes<7>(x, sums, s, rows, columns, plane, rows); });
    std::printf("lanes, 7 vectors,     block %5d: %6.2f ms %6.1f GFLOP/s\n", std::min(block, columns), ms, flop / ms / 1e6);
    if (block > columns) continue;
    const int count = static_cast<int>(density * block + 0.5);
    const Segments f = fixed_count(s, count);
    const double fixed_ms = median_ms([&] { lanes<7>(x, sums, f, rows, columns, plane, rows); });
    std::printf("  fixed-count %2d:                %6.2f ms %6.1f GFLOP/s\n", count, fixed_ms,
                2.0 * f.offset.size() * kBatch * plane / fixed_ms / 1e6);
    for (int chunk : {64, 256}) {
      const double chunk_ms = median_ms([&] { lanes<7>(x, sums, s, rows, columns, plane, chunk); });
      std::printf("  out-chunk %4d:                %6.2f ms %6.1f GFLOP/s\n", chunk, chunk_ms, flop / chunk_ms / 1e6);
    }
  }
  return 0;
}
