// Sparse 1x1 convolutions whose sums run as machine code written for the layer's sparsity pattern, with the batch in
// the AVX-512 vector lanes (batches that are a multiple of 16, x86-64 Linux).
//
// Why. The engine's sparse kernel (csrc/sparse_conv.cpp) reads each nonzero's offset and weight at run time and keeps
// one output channel's sums in registers, so each input vector it loads serves one FMA, and a row's nonzeros are cut
// into blocks of input channels (so that a block's window stays in L1) whose sums are loaded and stored around each
// block. On ResNet-50's 1x1 layers of stages 3 and 4 at batch 32 it ran at 29-39 GFLOP/s on one Zen 4 core, where
// DeepSparse ran them 1.5x (stage 3) and 2.1x (stage 4) as fast in all
// (bench/results/cpu-deepsparse-layers-resnet50-d0.1-b32-2026-12-07-amd-zen4.txt). Stand-alone probes
// (bench/prototypes/pointwise_sums_layouts.cpp) found the blocks' per-segment cost, not branch mispredicts nor the
// partial sums' traffic, bounding it. Code written for one layer (bench/prototypes/generated_conv_asm.py) ran the same
// sums at 43-78 GFLOP/s on one core (the reducing layers, whose 30-row loop bodies are 40-80 KiB of code against a 32
// KiB L1i, lowest; bench/results/ cpu-generated-conv-prototype-2026-12-07-amd-zen4.txt).
//
// What the code does. The input is copied per call into lanes[N / 16][C_in][H * W][16] (16 images a vector). For one
// image group and a chunk of consecutive positions, it computes every output channel: the sums of 30 output channels
// stay in zmm0..zmm29 across their whole rows (no blocks); each input channel that some row of the group uses is
// loaded once into zmm31 and serves every row that uses it (3 on average: 30 rows at 10% kept); each weight is an
// embedded-broadcast operand [weights + 4 j]{1to16} at a displacement fixed when the code is written, and each input
// channel's offset is its load's displacement: no index is read and no loop runs over nonzeros. Each row sums its
// nonzeros in input-channel order from zero, as sparse_conv2d does (its blocks split that chain without reordering
// it), and the epilogue is its (sum + bias) (+ residual), then ReLU: the outputs are sparse_conv2d's bit for bit.
//
// On an Intel Xeon (2 MiB L2 a core; bench/results/cpu-generated-code-ab-2026-12-07-intel-xeon.txt) the same layers
// lost inside ResNet-50 (0.59-1.11x, the network 0.90-0.95x): there the epilogue, which moves the output apart from
// any arithmetic, and the copy cost more than the faster sums gain, and the per-image kernel reads the engine's
// channel-padded inputs faster. SparseConv2d runs this code by default on other vendors' CPUs only
// (vpns_fast.deploy.sparse_cpu.generated_code_default).
//
// The code is written into an anonymous mapping that is made executable and read-only before it runs (never writable
// and executable at once); a system that refuses executable mappings gets a RuntimeError when the code is made, and
// SparseConv2d then keeps the layer on sparse_conv2d.
#include "activation.h"
#include "vpns_ops.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#include <immintrin.h>
#include <sys/mman.h>

#include "lanes_transpose.h"
#define VPNS_GENERATED 1
#else
#define VPNS_GENERATED 0
#endif

namespace vpns {

namespace {

constexpr int64_t kLanes = 16;     // images a vector
constexpr int kRowsAGroup = 30;    // output channels whose sums share the registers (zmm31 holds the input)
constexpr int64_t kMaxChunk = 16;  // the most positions a code call computes (a window of 16 x C_in vectors)

// General-purpose registers by their encoding numbers.
constexpr int kRcx = 1, kRdx = 2, kRsi = 6, kRdi = 7, kR8 = 8, kR9 = 9, kR10 = 10;

// The few x86-64 instructions the code needs, encoded by hand (EVEX for the AVX-512 ones; Intel SDM vol. 2, 2.7).
// Every memory operand is [base + disp32] with a base whose low 3 bits are not 4 or 5 (no SIB byte, no RIP form).
class Assembler {
 public:
  std::vector<uint8_t> bytes;

  void mov(int dst, int src) { rex_w_rr(0x89, src, dst); }  // mov dst, src (64-bit)
  void add(int dst, int32_t imm) {                          // add dst, imm32 (64-bit)
    byte(0x48 | (dst >> 3));
    byte(0x81);
    byte(0xC0 | (dst & 7));
    dword(static_cast<uint32_t>(imm));
  }
  void dec(int reg) {  // dec reg (64-bit)
    byte(0x48 | (reg >> 3));
    byte(0xFF);
    byte(0xC8 | (reg & 7));
  }
  size_t label() const { return bytes.size(); }
  void jnz(size_t target) {  // jnz rel32 to an earlier label
    byte(0x0F);
    byte(0x85);
    const int64_t rel = static_cast<int64_t>(target) - static_cast<int64_t>(bytes.size() + 4);
    TORCH_CHECK(rel == static_cast<int32_t>(rel), "sparse_pointwise_generate: a loop of more than 2 GiB of code");
    dword(static_cast<uint32_t>(static_cast<int32_t>(rel)));
  }
  void vzeroupper() {
    byte(0xC5);
    byte(0xF8);
    byte(0x77);
  }
  void ret() { byte(0xC3); }
  // vpxord zmm(r), zmm(r), zmm(r)
  void zero(int r) { evex_rr(0x01, 0x1, 0xEF, r, r, r); }
  // vmovaps zmm(r), [base + disp]
  void load(int r, int base, int32_t disp) { evex_rm(0x01, 0x0, 0x28, r, 0, base, disp, false); }
  // vmovaps [base + disp], zmm(r)
  void store(int base, int32_t disp, int r) { evex_rm(0x01, 0x0, 0x29, r, 0, base, disp, false); }
  // vfmadd231ps zmm(acc), zmm(src), dword ptr [base + disp]{1to16}
  void fma_broadcast(int acc, int src, int base, int32_t disp) { evex_rm(0x02, 0x1, 0xB8, acc, src, base, disp, true); }

 private:
  void byte(uint32_t b) { bytes.push_back(static_cast<uint8_t>(b)); }
  void dword(uint32_t d) {
    for (int i = 0; i < 4; ++i) byte((d >> (8 * i)) & 0xFF);
  }
  void rex_w_rr(uint32_t opcode, int reg, int rm) {
    byte(0x48 | ((reg >> 3) << 2) | (rm >> 3));
    byte(opcode);
    byte(0xC0 | ((reg & 7) << 3) | (rm & 7));
  }
  // EVEX.512 with no masking: map (1: 0F, 2: 0F38), pp (0: none, 1: 66), W0. vvvv is the second source.
  void evex(uint32_t map, uint32_t pp, int reg, int vvvv, int rm_high, bool broadcast) {
    byte(0x62);
    const uint32_t r = (~reg >> 3) & 1, r_high = (~reg >> 4) & 1, b = (~rm_high >> 3) & 1, x = (~rm_high >> 4) & 1;
    byte((r << 7) | (x << 6) | (b << 5) | (r_high << 4) | map);
    byte((((~vvvv) & 0xF) << 3) | 0x4 | pp);
    byte((0x2 << 5) | ((broadcast ? 1u : 0u) << 4) | (((~vvvv >> 4) & 1) << 3));
  }
  void evex_rr(uint32_t map, uint32_t pp, uint32_t opcode, int reg, int vvvv, int rm) {
    evex(map, pp, reg, vvvv, rm, false);
    byte(opcode);
    byte(0xC0 | ((reg & 7) << 3) | (rm & 7));
  }
  void evex_rm(uint32_t map, uint32_t pp, uint32_t opcode, int reg, int vvvv, int base, int32_t disp, bool broadcast) {
    // a memory operand: EVEX.X is set (no index); rm_high carries only the base's bit 3. Bases rsp/r12 (low bits 4)
    // would need a SIB byte, rbp/r13 (5) mean RIP-relative at mod 00: none is used
    TORCH_CHECK((base & 7) != 4 && (base & 7) != 5, "Assembler: base register ", base, " needs another encoding");
    evex(map, pp, reg, vvvv, base & 8, broadcast);
    byte(opcode);
    byte(0x80 | ((reg & 7) << 3) | (base & 7));
    dword(static_cast<uint32_t>(disp));
  }
};

// A block's function(x, y, weights, count): `count` positions from x (input lanes of one image group at the first
// position) into y (the block's sums, rows sums_pitch vectors apart, at the first position); x and y advance one vector
// a position.
using Code = void (*)(const float* x, float* y, const float* weights, int64_t count);

}  // namespace

GeneratedPointwise::~GeneratedPointwise() {
#if VPNS_GENERATED
  if (memory) munmap(memory, size);
#endif
}

namespace {

// The code's text for rows (row_ptr, channel_index): one function a block of rows_a_block rows, starting at the
// byte offsets `entries`; its weights in the order it reads them. Input channels lie `pitch` vectors apart; a block's
// sums go to [rows_a_block][span][16], rows `sums_pitch` vectors apart.
std::vector<uint8_t> write_code(const int64_t* rp, const int32_t* ci, const float* values, int64_t rows, int64_t pitch,
                                int64_t rows_a_block, int64_t sums_pitch, std::vector<float>& table,
                                std::vector<int64_t>& entries) {
  Assembler a;
  for (int64_t block = 0; block < rows; block += rows_a_block) {
    entries.push_back(static_cast<int64_t>(a.label()));
    a.mov(kR10, kRcx);
    for (int64_t first = block; first < std::min(rows, block + rows_a_block); first += kRowsAGroup) {
      const int64_t last = std::min({rows, first + kRowsAGroup, block + rows_a_block});
      a.mov(kR8, kRdi);
      a.mov(kR9, kRsi);
      a.mov(kRcx, kR10);
      const size_t top = a.label();
      for (int64_t o = first; o < last; ++o) a.zero(static_cast<int>(o - first));
      // each row's nonzeros in its own (input channel) order; rows sharing a channel share its load
      std::vector<int64_t> next(rp + first, rp + last);
      while (true) {
        int32_t channel = std::numeric_limits<int32_t>::max();
        for (int64_t o = first; o < last; ++o) {
          const int64_t k = next[static_cast<size_t>(o - first)];
          if (k < rp[o + 1]) channel = std::min(channel, ci[k]);
        }
        if (channel == std::numeric_limits<int32_t>::max()) break;
        a.load(31, kR8, static_cast<int32_t>(int64_t{channel} * pitch * kLanes * 4));
        for (int64_t o = first; o < last; ++o) {
          int64_t& k = next[static_cast<size_t>(o - first)];
          if (k < rp[o + 1] && ci[k] == channel) {
            a.fma_broadcast(static_cast<int>(o - first), 31, kRdx, static_cast<int32_t>(table.size() * 4));
            table.push_back(values[k]);
            ++k;
          }
        }
      }
      for (int64_t o = first; o < last; ++o) {
        a.store(kR9, static_cast<int32_t>((o - block) * sums_pitch * kLanes * 4), static_cast<int>(o - first));
      }
      a.add(kR8, kLanes * 4);
      a.add(kR9, kLanes * 4);
      a.dec(kRcx);
      a.jnz(top);
    }
    a.vzeroupper();
    a.ret();
  }
  return a.bytes;
}

// Positions a call of a block's code computes: its window (chunk x C_in vectors, 229 KB for 512 channels at 7) stays
// in cache while every group of the block's rows runs over it; ResNet's 7x7 and 14x14 planes in rows of 7 and 14.
// One call over a whole 7x7 plane ran 512 -> 2048 in 4.66 ms rather than 4.43 ms (rows of 7) on one Zen 4 core;
// windows capped at 256 KiB (2048 channels at 7x7 in chunks of 2, 1024 at 14x14 in chunks of 4) ran 2048 -> 512 at
// 7x7 0.95x and 1024 -> 256 at 14x14 0.97x as fast (2 threads, batch 32).
int64_t chunk_for(int64_t plane) {
  for (int64_t chunk = kMaxChunk; chunk > 1; --chunk) {
    if (plane % chunk == 0) return chunk;
  }
  return std::min(plane, kMaxChunk);
}

// An item's share: the positions it sums before its epilogue (span) and the rows it sums them for (a block), its
// sums ([rows][span][16]) within kSumsBytes. Every block reads the chunks' windows again, and a span shorter than the
// plane writes each image's output channel in pieces: all rows in spans of at least two chunks where they fit
// (reducing layers: 1024 -> 256 at 14x14 in spans of 42), else whole planes in blocks of rows (expanding ones).
constexpr int64_t kSumsBytes = 768 * 1024;
void share_items(int64_t rows, int64_t plane, int64_t chunk, int64_t& span, int64_t& rows_a_block) {
  const int64_t row_bytes = kLanes * 4;  // one position of one row
  if (rows == 0) {                       // no output channel: nothing to sum
    span = plane;
    rows_a_block = kRowsAGroup;
    return;
  }
  const int64_t all_rows_span = kSumsBytes / (rows * row_bytes) / chunk * chunk;
  if (all_rows_span >= plane || all_rows_span >= 2 * chunk) {
    span = std::min(plane, all_rows_span);
    rows_a_block = (rows + kRowsAGroup - 1) / kRowsAGroup * kRowsAGroup;
    return;
  }
  span = plane;
  rows_a_block = std::max<int64_t>(1, kSumsBytes / (plane * row_bytes) / kRowsAGroup) * kRowsAGroup;
}

#if VPNS_GENERATED
// Image group gi's channels [c0, c1) of x (NCHW, channels channel_stride floats apart) into lanes[c][p][16].
__attribute__((target("avx512f"))) void copy_into_lanes(const float* x, int64_t channels, int64_t channel_stride,
                                                        int64_t plane, int64_t gi, int64_t c, float* dst) {
  for (int64_t p0 = 0; p0 < plane; p0 += kLanes) {
    lanes::into_lanes(x + (gi * kLanes * channels + c) * channel_stride + p0, channels * channel_stride,
                      std::min(kLanes, plane - p0), dst + p0 * kLanes);
  }
}

// A block's sums ([rows][span][16], rows sums_pitch vectors apart; positions p0 .. p0 + count of the plane) with bias,
// residual and ReLU into rows o0 .. o0 + rows of the NCHW `out` of image group gi: 16 positions of an image's plane a
// store.
__attribute__((target("avx512f"))) void span_epilogue(const float* sums, int64_t sums_pitch, int64_t count, int64_t gi,
                                                      int64_t p0, int64_t o0, int64_t rows, int64_t out_channels,
                                                      const float* bias, const float* residual, int64_t residual_stride,
                                                      bool relu, float* out, int64_t out_stride) {
  for (int64_t o = o0; o < o0 + rows; ++o) {
    const int64_t first = gi * kLanes * out_channels + o;  // image gi * 16's channel o
    for (int64_t q = 0; q < count; q += kLanes) {
      lanes::from_lanes(sums + ((o - o0) * sums_pitch + q) * kLanes, std::min(kLanes, count - q), bias ? bias[o] : 0.0f,
                        residual ? residual + first * residual_stride + p0 + q : nullptr,
                        out_channels * residual_stride, relu, out + first * out_stride + p0 + q,
                        out_channels * out_stride);
    }
  }
}
#endif

// Whether a 4-d tensor's channels are planes of `plane` floats `stride(1)` apart, images channels * stride(1) apart.
bool planar(const at::Tensor& t, int64_t width, int64_t plane) {
  return t.stride(3) == 1 && t.stride(2) == width && t.stride(1) >= plane && t.stride(0) == t.size(1) * t.stride(1);
}

}  // namespace

bool sparse_pointwise_generated_supported(const std::vector<int64_t>& weight_shape,
                                          const std::vector<int64_t>& input_size, const std::vector<int64_t>& stride,
                                          const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation) {
  if (!VPNS_GENERATED || weight_shape.size() != 4 || input_size.size() != 2 || stride.size() != 2 ||
      padding.size() != 2 || dilation.size() != 2) {
    return false;
  }
  if (weight_shape[2] != 1 || weight_shape[3] != 1 || stride[0] != 1 || stride[1] != 1 || padding[0] != 0 ||
      padding[1] != 0) {
    return false;
  }
  // displacements within 32 bits (an input channel's, C_in * odd_pitch(H * W) vectors) and a block's sums of at
  // most 30 x 4096 positions (7.5 MiB); where it pays is SparseConv2d's rule (vpns_fast.deploy.sparse_cpu)
  const int64_t plane = input_size[0] * input_size[1];
  return plane > 0 && plane <= 4096 && weight_shape[1] * odd_pitch(plane) <= (int64_t{1} << 24);
}

std::tuple<std::shared_ptr<GeneratedPointwise>, at::Tensor> sparse_pointwise_generate(const at::Tensor& row_ptr,
                                                                                      const at::Tensor& channel_index,
                                                                                      const at::Tensor& values,
                                                                                      std::vector<int64_t> weight_shape,
                                                                                      std::vector<int64_t> input_size) {
  constexpr const char* op = "sparse_pointwise_generate";
  TORCH_CHECK(sparse_pointwise_generated_supported(weight_shape, input_size, {1, 1}, {0, 0}, {1, 1}), op,
              ": needs x86-64 Linux, a 1x1 weight_shape [C_out, C_in, 1, 1] and an input_size (H, W) of at most 4096 "
              "positions and C_in * odd_pitch(H * W) <= 2^24 (sparse_pointwise_generated_supported), got ",
              weight_shape, " and ", input_size);
  const int64_t rows = weight_shape[0], nnz = channel_index.numel();
  // every displacement within 32 bits: the weights' (an input channel's, C_in * odd_pitch(H * W) <= 2^24 vectors, and
  // an output row's in a block's sums, about kSumsBytes, are far below)
  TORCH_CHECK(nnz < (int64_t{1} << 29), op, ": too many nonzeros for 32-bit displacements, got ", nnz);
  TORCH_CHECK(row_ptr.device().is_cpu() && channel_index.device().is_cpu() && values.device().is_cpu(), op,
              ": row_ptr, channel_index and values must be CPU tensors");
  TORCH_CHECK(row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 1 && row_ptr.numel() == rows + 1 &&
                  row_ptr.is_contiguous() && channel_index.scalar_type() == at::kInt && channel_index.is_contiguous() &&
                  values.scalar_type() == at::kFloat && values.is_contiguous() && values.numel() == nnz,
              op,
              ": expected sparse_conv2d_pack's row_ptr (int64 [C_out + 1]), channel_index (int32) and values "
              "(float32), contiguous, of one length");
  const int64_t* rp = row_ptr.const_data_ptr<int64_t>();
  const int32_t* ci = channel_index.const_data_ptr<int32_t>();
  TORCH_CHECK(rp[0] == 0 && rp[rows] == nnz, op, ": row_ptr does not span the nonzeros");
  // the whole of row_ptr before any row is read: [0, huge, nnz] had read past channel_index (an outside review)
  for (int64_t o = 0; o < rows; ++o) TORCH_CHECK(rp[o] <= rp[o + 1], op, ": row_ptr must not decrease");
  for (int64_t o = 0; o < rows; ++o) {
    for (int64_t k = rp[o]; k < rp[o + 1]; ++k) {
      TORCH_CHECK(ci[k] >= 0 && ci[k] < weight_shape[1], op, ": channel_index out of range for weight_shape");
      TORCH_CHECK(k == rp[o] || ci[k] > ci[k - 1], op, ": a row's nonzeros must be sorted by input channel");
    }
  }
  auto generated = std::make_shared<GeneratedPointwise>();
  generated->in_channels = weight_shape[1];
  generated->out_channels = rows;
  generated->plane = input_size[0] * input_size[1];
  generated->chunk = chunk_for(generated->plane);
  share_items(rows, generated->plane, generated->chunk, generated->span, generated->rows_a_block);
  std::vector<float> table;
  table.reserve(static_cast<size_t>(nnz));
  generated->pitch = odd_pitch(generated->plane);
  generated->sums_pitch = odd_pitch(generated->span);
  const std::vector<uint8_t> text =
      write_code(rp, ci, values.const_data_ptr<float>(), rows, generated->pitch, generated->rows_a_block,
                 generated->sums_pitch, table, generated->entries);
#if VPNS_GENERATED
  const size_t page = 4096, size = std::max<size_t>(page, (text.size() + page - 1) / page * page);
  void* memory = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  TORCH_CHECK(memory != MAP_FAILED, op, ": this system refuses executable memory (mmap of ", size,
              " bytes for the code failed)");
  std::memcpy(memory, text.data(), text.size());
  if (mprotect(memory, size, PROT_READ | PROT_EXEC) != 0) {
    munmap(memory, size);
    TORCH_CHECK(false, op, ": this system refuses executable memory (mprotect PROT_EXEC)");
  }
  generated->memory = memory;
  generated->size = size;
#endif
  generated->weights = static_cast<int64_t>(table.size());
  at::Tensor ordered = at::empty({generated->weights}, at::kFloat);
  std::copy(table.begin(), table.end(), ordered.mutable_data_ptr<float>());
  return {generated, ordered};
}

at::Tensor sparse_pointwise_generated(const at::Tensor& input, const std::shared_ptr<GeneratedPointwise>& code,
                                      const at::Tensor& table, const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& residual, int64_t activation,
                                      bool aligned_output) {
  constexpr const char* op = "sparse_pointwise_generated";
  TORCH_CHECK(code != nullptr && code->memory != nullptr, op, ": code is None or empty");
  TORCH_CHECK(avx512_kernels_chosen(), op, ": needs the AVX-512 sparse kernel (sparse_kernel_isa)");
  TORCH_CHECK(input.device().is_cpu() && input.scalar_type() == at::kFloat && input.dim() == 4, op,
              ": input must be a 4-d float32 CPU tensor [N, C_in, H, W]");
  TORCH_CHECK(activation == epilogue::kIdentity || activation == epilogue::kRelu, op,
              ": activation must be 0 (none) or 1 (relu), got ", activation);
  const int64_t batch = input.size(0), height = input.size(2), width = input.size(3), plane = height * width;
  TORCH_CHECK(batch > 0 && batch % kLanes == 0, op, ": the batch must be a multiple of ", kLanes, ", got ", batch);
  TORCH_CHECK(input.size(1) == code->in_channels && plane == code->plane, op, ": the code was written for ",
              code->in_channels, " channels of ", code->plane, " positions, got ", input.size(1), " of ", plane);
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kFloat && table.dim() == 1 &&
                  table.is_contiguous() && table.numel() == code->weights,
              op, ": table must be the contiguous float32 tensor sparse_pointwise_generate returned with the code");
  const int64_t out_channels = code->out_channels;
  std::optional<at::Tensor> b;
  if (bias && bias->defined()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->numel() == out_channels,
                op, ": bias must be a float32 CPU tensor [C_out]");
    b = bias->contiguous();
  }
  at::NoGradGuard no_grad;
  // the channels' stride as read: an input that is not planar is read contiguous (contiguous_activation hands back
  // a tensor torch calls contiguous as it is, whose size-1 channel dimension may have any stride: an outside review
  // found a 1-channel permuted input read at its stride(1), wrong outputs or a crash)
  const bool input_planar = planar(input, width, plane);
  at::Tensor x = input_planar ? input : contiguous_activation(input);
  const int64_t channel_stride = input_planar ? input.stride(1) : plane;
  std::optional<at::Tensor> r;
  int64_t residual_stride = 0;
  if (residual && residual->defined()) {
    TORCH_CHECK(residual->device().is_cpu() && residual->scalar_type() == at::kFloat &&
                    residual->sizes() == at::IntArrayRef({batch, out_channels, height, width}),
                op, ": residual must be a float32 CPU tensor of the output's shape");
    const bool residual_planar = planar(*residual, width, plane);  // as the input: read contiguous unless planar
    r = residual_planar ? *residual : contiguous_activation(*residual);
    residual_stride = residual_planar ? residual->stride(1) : plane;
  }
  const int64_t out_stride = aligned_output ? aligned_channel_stride(plane) : plane;
  at::Tensor output = out_stride == plane ? empty_activation({batch, out_channels, height, width})
                                          : empty_activation({batch, out_channels, out_stride})
                                                .as_strided({batch, out_channels, height, width},
                                                            {out_channels * out_stride, out_stride, width, 1});
#if VPNS_GENERATED
  const int64_t groups = batch / kLanes, channels = code->in_channels, chunk = code->chunk;
  TORCH_CHECK(
      static_cast<int64_t>(code->entries.size()) == (out_channels + code->rows_a_block - 1) / code->rows_a_block, op,
      ": the code's blocks are not its rows'");
  const int64_t pitch = code->pitch;
  at::Tensor lanes = empty_scratch({groups * channels * pitch * kLanes + kLanes});
  float* lanes_data = lanes.mutable_data_ptr<float>();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(lanes_data) % 64 == 0, op, ": scratch not 64-byte aligned");
  const float* x_data = x.const_data_ptr<float>();
  at::parallel_for(0, groups * channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      copy_into_lanes(x_data, channels, channel_stride, plane, item / channels, item % channels,
                      lanes_data + item * pitch * kLanes);
    }
  });
  const float* weights = table.const_data_ptr<float>();
  float* out_data = output.mutable_data_ptr<float>();
  const float* bias_data = b ? b->const_data_ptr<float>() : nullptr;
  const float* residual_data = r ? r->const_data_ptr<float>() : nullptr;
  const int64_t span = code->span, rows_a_block = code->rows_a_block, sums_pitch = code->sums_pitch;
  const int64_t blocks = (out_channels + rows_a_block - 1) / rows_a_block, spans = (plane + span - 1) / span;
  const uint8_t* text = static_cast<const uint8_t*>(code->memory);
  at::parallel_for(0, groups * blocks * spans, 1, [&](int64_t begin, int64_t end) {
    // the block's sums, 64-byte aligned (the code stores aligned vectors), kept by the thread between calls
    thread_local std::vector<float> scratch;
    scratch.resize(static_cast<size_t>(rows_a_block * sums_pitch * kLanes + kLanes));
    float* sums = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(scratch.data()) + 63) & ~uintptr_t{63});
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item % spans, block = item / spans % blocks, gi = item / (spans * blocks);
      const int64_t p0 = s * span, count = std::min(span, plane - p0), o0 = block * rows_a_block;
      const Code run = reinterpret_cast<Code>(text + code->entries[static_cast<size_t>(block)]);
      for (int64_t p = p0; p < p0 + count; p += chunk) {
        run(lanes_data + (gi * channels * pitch + p) * kLanes, sums + (p - p0) * kLanes, weights,
            std::min(chunk, p0 + count - p));
      }
      span_epilogue(sums, sums_pitch, count, gi, p0, o0, std::min(rows_a_block, out_channels - o0), out_channels,
                    bias_data, residual_data, residual_stride, activation == epilogue::kRelu, out_data, out_stride);
    }
  });
  zero_aligned_padding(out_data, batch * out_channels, plane, out_stride);
#else
  TORCH_CHECK(false, op, ": built without x86-64 Linux support");
#endif
  return output;
}

}  // namespace vpns
