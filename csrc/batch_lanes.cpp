// A sparse 3x3 convolution for batches of 16 images and more with the batch in the AVX-512 vector lanes.
//
// The engine's sparse kernel (csrc/sparse_conv.cpp) computes each image apart: a tile is a run of one image's output
// positions. A 7x7 output (49 positions, 63 with the padded plane's extra columns) then fills 4 vectors of 64 lanes,
// and a 3x3 tap moves the window by one column, so most of its 64-byte loads straddle two cache lines. Here the input
// of each call is copied into lanes[N / 16][C][H + 3][W + 2 (+1 at stride 2)][16]: 16 images share each vector,
// every tap of every output position is one aligned load, and a tile is 14 output positions (a row of 14, or two
// rows of 7) of 16 images, 14 accumulators in registers. The nonzeros of an output channel are grouped by blocks of
// 16 input channels, block-major as sparse_conv2d_offsets lays them out, and summed in the same order as the engine's
// kernel, so the outputs are bit for bit those of sparse_conv2d.
//
// Where it runs (SparseConv2d chooses it): 3x3 kernels, padding 1, dilation 1, stride 1 or 2, outputs 7x7 or 14x14,
// batches that are a multiple of 16, no residual, no activation or ReLU, the AVX-512 kernel. A prototype measured
// it as a whole layer (the copy in, the sums, bias + ReLU, the NCHW output) on one thread at batch 32 and 10% kept
// against sparse_conv2d (bench/prototypes/batch_lanes_conv.cpp, bench/results/cpu-batch-lanes-3x3-prototype-
// 2026-12-07-amd-zen5.txt, 2-vCPU Zen 5): 7x7 outputs 1.85-1.97x, 14x14 outputs 1.08-1.34x, 28x28 and 56x56 outputs
// 0.67-1.09x (the copy outweighs the gain there, so those stay with sparse_conv2d); channel blocks of 32 ran 8.3 ms
// against 6.3 ms for 16 at 7x7. Built in, 2 threads: 512 -> 512 at 7x7, batch 32, 6.36 -> 3.39 ms alone; inside
// ResNet-50 at 10% kept (forward hooks, medians of 3 calls each way) the 14x14 layers 1.33-1.37x, the 7x7 ones
// 1.66-1.73x, the stride-2 ones 1.15x (to 14x14) and 1.52x (to 7x7); whole networks both ways in one process
// (bench/results/cpu-batch-lanes-ab-2026-12-07-amd-zen5.txt): ResNet-50 1.047x at 10% kept and 1.009x at 5%,
// ResNet-18 1.050x and 1.027-1.049x, ResNet-50 at 50% kept and MobileNetV2 within the noise.
#include "activation.h"
#include "vpns_ops.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

#include "lanes_transpose.h"
#define VPNS_LANES 1
#else
#define VPNS_LANES 0
#endif

namespace {

constexpr int64_t kLanes = 16;         // images a vector
constexpr int64_t kTile = 14;          // output positions a tile (accumulators)
constexpr int64_t kChannelBlock = 16;  // input channels a block of nonzeros (its windows stay in L1)
constexpr int64_t kRowBlock = 64;      // output channels an item sums before its epilogue
// segments ends with the geometry the pack was made for (C_in, H, W, stride): a pack for another input size must
// not run (its offsets can stay in range and still read the wrong taps).
constexpr int64_t kGeometryEntries = 4;

// The copy's geometry: each input channel a padded plane of rows x cols vectors, planes an odd number of vectors apart
// (odd_pitch). One row more than the padding needs (a tile of two output rows at stride 2 reads past the last
// padded row otherwise) and, at stride 2, one column more.
struct Lanes {
  int64_t batch, channels, height, width, out_channels, stride, out_h, out_w, rows, cols;
  int64_t plane_floats() const { return vpns::odd_pitch(rows * cols) * kLanes; }
  int64_t groups() const { return batch / kLanes; }
};

Lanes lanes_geometry(const char* op, const std::vector<int64_t>& weight_shape, int64_t batch, int64_t height,
                     int64_t width, const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                     const std::vector<int64_t>& dilation) {
  TORCH_CHECK(weight_shape.size() == 4 && stride.size() == 2 && padding.size() == 2 && dilation.size() == 2, op,
              ": weight_shape must have 4 entries and stride, padding, dilation 2");
  TORCH_CHECK(vpns::sparse_conv2d_lanes_supported(weight_shape, {height, width}, stride, padding, dilation), op,
              ": needs a 3x3 kernel, padding 1, dilation 1, stride 1 or 2 and a 7x7 or 14x14 output (see "
              "sparse_conv2d_lanes_supported), got weight ",
              weight_shape, ", input ", height, "x", width, ", stride ", stride, ", padding ", padding, ", dilation ",
              dilation);
  Lanes g;
  g.batch = batch;
  g.channels = weight_shape[1];
  g.out_channels = weight_shape[0];
  g.height = height;
  g.width = width;
  g.stride = stride[0];
  g.out_h = (height - 1) / g.stride + 1;
  g.out_w = (width - 1) / g.stride + 1;
  g.rows = height + 3;
  g.cols = width + 2 + (g.stride == 2 ? 1 : 0);
  return g;
}

#if VPNS_LANES
// Channel c of image group gi copied from x (channels `channel_stride` floats apart, images channels * stride apart)
// into its zero-bordered plane.
__attribute__((target("avx512f"))) void copy_into_lanes(const Lanes& g, const float* x, int64_t channel_stride,
                                                        int64_t gi, int64_t c, float* plane) {
  std::memset(plane, 0, static_cast<size_t>(g.plane_floats()) * sizeof(float));
  for (int64_t h = 0; h < g.height; ++h) {
    for (int64_t w0 = 0; w0 < g.width; w0 += kLanes) {
      vpns::lanes::into_lanes(x + (gi * kLanes * g.channels + c) * channel_stride + h * g.width + w0,
                              g.channels * channel_stride, std::min(kLanes, g.width - w0),
                              plane + ((h + 1) * g.cols + w0 + 1) * kLanes);
    }
  }
}

// kRows output rows of kCols positions, stride kStride; `row_pitch`: floats from one output row's window to the next.
template <int kRows, int kCols, int kStride, bool kFirst>
__attribute__((target("avx512f"), always_inline)) inline void tile(const float* src, int64_t row_pitch,
                                                                   const int32_t* offsets, const float* values,
                                                                   int64_t count, float* sums) {
  constexpr int kVectors = kRows * kCols;
  __m512 acc[kVectors];
#pragma GCC unroll 16
  for (int v = 0; v < kVectors; ++v) acc[v] = kFirst ? _mm512_setzero_ps() : _mm512_load_ps(sums + v * kLanes);
  for (int64_t k = 0; k < count; ++k) {
    const float* p = src + offsets[k];
    const __m512 w = _mm512_set1_ps(values[k]);
#pragma GCC unroll 16
    for (int v = 0; v < kVectors; ++v) {
      acc[v] = _mm512_fmadd_ps(w, _mm512_load_ps(p + (v / kCols) * row_pitch + (v % kCols) * kStride * kLanes), acc[v]);
    }
  }
#pragma GCC unroll 16
  for (int v = 0; v < kVectors; ++v) _mm512_store_ps(sums + v * kLanes, acc[v]);
}

// Rows [o0, o1) over one tile: every channel block in turn, as sparse_conv2d sums them.
template <int kRows, int kCols, int kStride>
__attribute__((target("avx512f"))) void tile_rows(const float* src, int64_t row_pitch, const int64_t* segments,
                                                  const int32_t* offsets, const float* values, int64_t blocks,
                                                  int64_t out_channels, int64_t o0, int64_t o1, float* sums) {
  for (int64_t j = 0; j < blocks; ++j) {
    for (int64_t o = o0; o < o1; ++o) {
      const int64_t at = j * out_channels + o, b = segments[at], count = segments[at + 1] - b;
      float* s = sums + (o - o0) * kTile * kLanes;
      if (j == 0) {
        tile<kRows, kCols, kStride, true>(src, row_pitch, offsets + b, values + b, count, s);
      } else if (count > 0) {
        tile<kRows, kCols, kStride, false>(src, row_pitch, offsets + b, values + b, count, s);
      }
    }
  }
}

// (sum + bias), ReLU where asked, into the NCHW output (channels out_stride floats apart) of the 16 images of group
// gi, the tile's positions (oh0 + r, ow0 + c) for r < rows, c < cols.
__attribute__((target("avx512f"))) void epilogue(const Lanes& g, int64_t gi, int64_t o0, int64_t o1, int64_t oh0,
                                                 int64_t ow0, int64_t rows, int64_t cols, const float* sums,
                                                 const float* bias, bool relu, float* out, int64_t out_stride) {
  for (int64_t o = o0; o < o1; ++o) {
    for (int64_t r = 0; r < rows; ++r) {
      vpns::lanes::from_lanes(sums + ((o - o0) * kTile + r * cols) * kLanes, cols, bias ? bias[o] : 0.0f, nullptr, 0,
                              relu, out + (gi * kLanes * g.out_channels + o) * out_stride + (oh0 + r) * g.out_w + ow0,
                              g.out_channels * out_stride);
    }
  }
}

template <int kStride>
void sums_and_epilogue(const Lanes& g, const float* lanes, const int64_t* segments, const int32_t* offsets,
                       const float* values, int64_t blocks, const float* bias, bool relu, float* out,
                       int64_t out_stride) {
  // tiles: a row of 14 (14x14 outputs), or two rows of 7 (7x7 outputs; the last tile one row)
  const int64_t tile_rows_count = g.out_w == kTile ? 1 : 2;
  const int64_t tiles = (g.out_h + tile_rows_count - 1) / tile_rows_count;
  const int64_t row_blocks = (g.out_channels + kRowBlock - 1) / kRowBlock;
  const int64_t row_pitch = g.cols * kLanes * kStride;
  const int64_t items = g.groups() * tiles * row_blocks;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float, std::allocator<float>> scratch(static_cast<size_t>(kRowBlock * kTile * kLanes + kLanes));
    // 64-byte aligned sums inside the vector
    float* sums = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t{63});
    for (int64_t item = begin; item < end; ++item) {
      const int64_t rb = item % row_blocks, t = item / row_blocks % tiles, gi = item / (row_blocks * tiles);
      const int64_t o0 = rb * kRowBlock, o1 = std::min(g.out_channels, o0 + kRowBlock);
      const int64_t oh0 = t * tile_rows_count, rows = std::min(tile_rows_count, g.out_h - oh0);
      const float* src = lanes + gi * g.channels * g.plane_floats() + oh0 * kStride * g.cols * kLanes;
      if (g.out_w == kTile) {
        tile_rows<1, kTile, kStride>(src, row_pitch, segments, offsets, values, blocks, g.out_channels, o0, o1, sums);
      } else if (rows == 2) {
        tile_rows<2, 7, kStride>(src, row_pitch, segments, offsets, values, blocks, g.out_channels, o0, o1, sums);
      } else {
        tile_rows<1, 7, kStride>(src, row_pitch, segments, offsets, values, blocks, g.out_channels, o0, o1, sums);
      }
      epilogue(g, gi, o0, o1, oh0, 0, rows, g.out_w, sums, bias, relu, out, out_stride);
    }
  });
}
#endif

}  // namespace

namespace vpns {

bool sparse_conv2d_lanes_supported(const std::vector<int64_t>& weight_shape, const std::vector<int64_t>& input_size,
                                   const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                                   const std::vector<int64_t>& dilation) {
  if (weight_shape.size() != 4 || input_size.size() != 2 || stride.size() != 2 || padding.size() != 2 ||
      dilation.size() != 2) {
    return false;
  }
  if (weight_shape[2] != 3 || weight_shape[3] != 3 || padding[0] != 1 || padding[1] != 1 || dilation[0] != 1 ||
      dilation[1] != 1 || stride[0] != stride[1] || (stride[0] != 1 && stride[0] != 2) ||
      input_size[0] != input_size[1]) {
    return false;
  }
  const int64_t out = (input_size[0] - 1) / stride[0] + 1;
  return out == 7 || out == 14;
}

std::vector<at::Tensor> sparse_conv2d_lanes_pack(const at::Tensor& row_ptr, const at::Tensor& channel_index,
                                                 const at::Tensor& tap_index, const at::Tensor& values,
                                                 std::vector<int64_t> weight_shape, std::vector<int64_t> input_size,
                                                 std::vector<int64_t> stride, std::vector<int64_t> padding,
                                                 std::vector<int64_t> dilation) {
  constexpr const char* op = "sparse_conv2d_lanes_pack";
  TORCH_CHECK(input_size.size() == 2, op, ": input_size must be (H, W)");
  const Lanes g = lanes_geometry(op, weight_shape, kLanes, input_size[0], input_size[1], stride, padding, dilation);
  const int64_t rows = g.out_channels, nnz = channel_index.numel();
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 1 && row_ptr.numel() == rows + 1 &&
                  row_ptr.is_contiguous() && channel_index.scalar_type() == at::kInt && channel_index.is_contiguous() &&
                  tap_index.scalar_type() == at::kInt && tap_index.is_contiguous() && tap_index.numel() == nnz &&
                  values.scalar_type() == at::kFloat && values.is_contiguous() && values.numel() == nnz,
              op,
              ": expected sparse_conv2d_pack's (row_ptr int64 [C_out + 1], channel_index int32, tap_index int32, "
              "values float32), each contiguous and of one length");
  const int64_t* rp = row_ptr.const_data_ptr<int64_t>();
  TORCH_CHECK(rp[0] == 0 && rp[rows] == nnz, op, ": row_ptr does not span the nonzeros");
  const int32_t* ci = channel_index.const_data_ptr<int32_t>();
  const int32_t* ti = tap_index.const_data_ptr<int32_t>();
  const float* vals = values.const_data_ptr<float>();
  const int64_t blocks = (g.channels + kChannelBlock - 1) / kChannelBlock;
  // each (row, block) run, then laid out block-major: sparse_conv2d's order within a row (by input channel)
  std::vector<int64_t> count(static_cast<size_t>(rows * blocks), 0);
  for (int64_t o = 0; o < rows; ++o) {
    TORCH_CHECK(rp[o] <= rp[o + 1], op, ": row_ptr must not decrease");
    for (int64_t k = rp[o]; k < rp[o + 1]; ++k) {
      TORCH_CHECK(ci[k] >= 0 && ci[k] < g.channels && ti[k] >= 0 && ti[k] < 9, op,
                  ": channel_index/tap_index out of range for weight_shape");
      TORCH_CHECK(k == rp[o] || ci[k] >= ci[k - 1], op, ": nonzeros must be sorted by input channel");
      ++count[static_cast<size_t>(ci[k] / kChannelBlock * rows + o)];
    }
  }
  at::Tensor segments = at::empty({rows * blocks + 1 + kGeometryEntries}, at::kLong);
  int64_t* seg = segments.mutable_data_ptr<int64_t>();
  seg[0] = 0;
  for (int64_t i = 0; i < rows * blocks; ++i) seg[i + 1] = seg[i] + count[static_cast<size_t>(i)];
  const int64_t geometry[kGeometryEntries] = {g.channels, g.height, g.width, g.stride};
  std::copy(geometry, geometry + kGeometryEntries, seg + rows * blocks + 1);
  at::Tensor offsets = at::empty({nnz}, at::kInt), ordered = at::empty({nnz}, at::kFloat);
  int32_t* off = offsets.mutable_data_ptr<int32_t>();
  float* out_values = ordered.mutable_data_ptr<float>();
  std::vector<int64_t> next(seg, seg + rows * blocks);
  TORCH_CHECK(g.channels * g.plane_floats() < std::numeric_limits<int32_t>::max(), op,
              ": input too large for 32-bit offsets");
  for (int64_t o = 0; o < rows; ++o) {
    for (int64_t k = rp[o]; k < rp[o + 1]; ++k) {
      const int64_t at = next[static_cast<size_t>(ci[k] / kChannelBlock * rows + o)]++;
      off[at] = static_cast<int32_t>(ci[k] * g.plane_floats() + (ti[k] / 3 * g.cols + ti[k] % 3) * kLanes);
      out_values[at] = vals[k];
    }
  }
  return {offsets, segments, ordered};
}

at::Tensor sparse_conv2d_lanes(const at::Tensor& input, const at::Tensor& segments, const CheckedOffsets& offsets,
                               const at::Tensor& values, std::vector<int64_t> weight_shape,
                               const std::optional<at::Tensor>& bias, std::vector<int64_t> stride,
                               std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t activation,
                               bool aligned_output) {
  constexpr const char* op = "sparse_conv2d_lanes";
  TORCH_CHECK(avx512_kernels_chosen(), op, ": needs the AVX-512 sparse kernel (sparse_kernel_isa)");
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == at::kFloat && input.dim() == 4, op,
              ": input must be a 4-d float32 CPU tensor [N, C_in, H, W]");
  TORCH_CHECK(activation == epilogue::kIdentity || activation == epilogue::kRelu, op,
              ": activation must be 0 (none) or 1 (relu), got ", activation);
  const Lanes g =
      lanes_geometry(op, weight_shape, input.size(0), input.size(2), input.size(3), stride, padding, dilation);
  TORCH_CHECK(g.batch > 0 && g.batch % kLanes == 0, op, ": the batch must be a multiple of ", kLanes, ", got ",
              g.batch);
  TORCH_CHECK(input.size(1) == g.channels, op, ": input has ", input.size(1), " channels, the weight expects ",
              g.channels);
  const int64_t blocks = (g.channels + kChannelBlock - 1) / kChannelBlock;
  const int64_t runs = g.out_channels * blocks;
  for (const at::Tensor* t : {&segments, &values}) {
    TORCH_CHECK(t->device().is_cpu() && t->dim() == 1 && t->is_contiguous(), op,
                ": segments and values must be contiguous 1-d CPU tensors from sparse_conv2d_lanes_pack");
  }
  TORCH_CHECK(segments.scalar_type() == at::kLong && segments.numel() == runs + 1 + kGeometryEntries &&
                  values.scalar_type() == at::kFloat && offsets.offsets.numel() == values.numel(),
              op, ": segments, offsets and values must come from sparse_conv2d_lanes_pack for this weight");
  const int64_t* seg = segments.const_data_ptr<int64_t>();
  const int64_t* packed_for = seg + runs + 1;
  TORCH_CHECK(
      packed_for[0] == g.channels && packed_for[1] == g.height && packed_for[2] == g.width && packed_for[3] == g.stride,
      op, ": offsets do not fit this input (", g.height, "x", g.width, " at stride ", g.stride,
      "; they were packed for ", packed_for[1], "x", packed_for[2], " at stride ", packed_for[3],
      "); make them with sparse_conv2d_lanes_pack for this input size");
  // the runs in order and within the nonzeros (a malformed set read past them), each offset inside the planes and
  // on a vector (one off a vector mixes images)
  bool ordered = seg[0] == 0 && seg[runs] == values.numel();
  for (int64_t i = 0; i < runs; ++i) ordered &= seg[i] <= seg[i + 1];
  TORCH_CHECK(ordered, op, ": segments must not decrease and must span the nonzeros");
  // each offset inside the planes and on a vector (one off a vector mixes images), from the checked copy's extremes
  // and OR-ed bits: no pass over the offsets at each call (a stand-alone copy of that pass took 0.1 ms for 236K
  // offsets, against a 3 ms layer)
  const int64_t limit = (g.channels - 1) * g.plane_floats() + (2 * g.cols + 2) * kLanes;
  TORCH_CHECK(
      offsets.offsets.numel() == 0 || (offsets.lo >= 0 && offsets.hi <= limit && (offsets.bits & (kLanes - 1)) == 0),
      op, ": offsets outside this input's planes or off a vector; make them with sparse_conv2d_lanes_pack");
  const int32_t* off = offsets.offsets.const_data_ptr<int32_t>();
  std::optional<at::Tensor> b;
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->numel() == g.out_channels,
                op, ": bias must be a float32 CPU tensor [C_out]");
    b = bias->contiguous();
  }
  at::NoGradGuard no_grad;
  // the input's channels: contiguous, or an aligned activation's stride (images channels * stride apart)
  at::Tensor x = input;
  int64_t channel_stride = g.height * g.width;
  const bool planar = x.stride(3) == 1 && x.stride(2) == g.width && x.stride(1) >= g.height * g.width &&
                      x.stride(0) == g.channels * x.stride(1);
  if (planar) {
    channel_stride = x.stride(1);
  } else {
    x = contiguous_activation(x);
  }
  const int64_t plane = g.out_h * g.out_w;
  const int64_t out_stride = aligned_output ? aligned_channel_stride(plane) : plane;
  at::Tensor output = out_stride == plane ? empty_activation({g.batch, g.out_channels, g.out_h, g.out_w})
                                          : empty_activation({g.batch, g.out_channels, out_stride})
                                                .as_strided({g.batch, g.out_channels, g.out_h, g.out_w},
                                                            {g.out_channels * out_stride, out_stride, g.out_w, 1});
#if VPNS_LANES
  at::Tensor lanes = empty_scratch({g.groups() * g.channels * g.plane_floats() + kLanes});
  float* lanes_data = lanes.mutable_data_ptr<float>();
  // a 64-byte boundary for the planes (the scratch allocator aligns; checked, not assumed)
  TORCH_CHECK(reinterpret_cast<uintptr_t>(lanes_data) % 64 == 0, op, ": scratch not 64-byte aligned");
  const float* x_data = x.const_data_ptr<float>();
  at::parallel_for(0, g.groups() * g.channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      copy_into_lanes(g, x_data, channel_stride, item / g.channels, item % g.channels,
                      lanes_data + item * g.plane_floats());
    }
  });
  float* out_data = output.mutable_data_ptr<float>();
  const float* bias_data = b ? b->const_data_ptr<float>() : nullptr;
  const bool relu = activation == epilogue::kRelu;
  if (g.stride == 1) {
    sums_and_epilogue<1>(g, lanes_data, seg, off, values.const_data_ptr<float>(), blocks, bias_data, relu, out_data,
                         out_stride);
  } else {
    sums_and_epilogue<2>(g, lanes_data, seg, off, values.const_data_ptr<float>(), blocks, bias_data, relu, out_data,
                         out_stride);
  }
  zero_aligned_padding(out_data, g.batch * g.out_channels, plane, out_stride);
#else
  TORCH_CHECK(false, op, ": built without AVX-512 support");
#endif
  return output;
}

}  // namespace vpns
