// Direct sparse convolution and sparse linear for pruned (unstructured) float32 weights on the CPU.
//
// Design decisions. Machine: 2-core AMD EPYC KVM guest (AVX2 + FMA, no AVX-512; L1d 32 KiB, L2
// 1 MiB per core), torch 2.14.1, float32, ResNet-18 @224 layer shapes, uniform random masks. Times
// are medians of interleaved rounds (bench/infer_cpu.py, since replaced by the harness case
// bench/cases/infer.py) unless marked "min" (minimum of repeats,
// used while tuning because the machine was shared: load average 3-7 then, 0.3-1.5 for the tables).
// * Direct convolution, no im2col. Each output channel keeps its nonzeros in (c_in, kh, kw) order
//   (CSR over output channels, values + int32 input offsets). The zero-padded input is copied once
//   per call into stride_h x stride_w phase planes (plane (a, b) = padded[i*sh + a][j*sw + b]), so
//   every tap of any stride/dilation reads one contiguous run of the plane, and outputs are
//   computed over rows of plane_w (a few garbage columns per row, dropped on copy-out): one tap is
//   one offset over the whole flattened output plane. Only the phases some tap uses are built
//   (a 1x1 stride-2 conv copies a quarter of its input). NHWC was not tried.
// * Inner kernel: a register tile of up to 12 AVX2 vectors (96 output positions) of one output
//   channel; per nonzero one broadcast and 12 FMAs with memory operands. 12 rather than 8 vectors:
//   0-8% faster (1 thread, min, 3x3 at 28/56/112 px, 8-256 input channels). Tail tiles use fewer vectors
//   (templates 1..12), so a 7x9 layer4 plane costs 8 vectors, not 12. Runtime dispatch
//   (__builtin_cpu_supports) between the target("avx2,fma") kernel and a portable scalar one.
// * On CPUs with AVX-512 the same tile is zmm vectors (target("avx512f"); 6 at first, up to 12 since the wide tiles,
//   see even_tile; the default since on Intel, Zen 5 and Zen 4, see default_isa): 2-vCPU Intel Xeon (AMX,
//   2 MiB L2 a core), 2 threads, 10% kept, per-round ratios against the AVX2 tile in one process (12
//   interleaved rounds at batch 1, 6 at batch 32, 2026-12-03): ResNet-18 batch 1 1.075x (p20-p80
//   1.065-1.079x), ResNet-50 batch 1 1.068x (1.057-1.074x), ResNet-18 batch 32 1.040x (1.030-1.044x); per
//   3x3 layer 1.04-1.14x, stride-2 1x1 layers 0.94-0.99x (49-57 us). Still bound by loads: with 6
//   accumulators a tile has fewer FMA chains than two FMA units with 4-cycle latency need, but a variant with
//   two accumulator sets (even and odd nonzeros) measured the same (4 layer shapes, 81-98 GFLOP/s each way);
//   a 1x1 conv at 16x16, whose loads are all aligned, ran at 57 GFLOP/s on one core against 39 at 15x15.
// * Loop order tile -> input-channel block -> output channels of the work item: a block's input
//   window (<= 24 KiB, e.g. ~28 channels at 56x58) stays in L1 while all output channels read it;
//   partial sums accumulate in a per-thread wide buffer. 1 thread, min, density 0.1, C_out 64/C_in
//   64 @56 / 128 @28 / 256 @14 / 512 @7: one block (no blocking) 0.736 / 0.783 / 0.766 / 0.971 ms,
//   auto block 0.616 / 0.576 / 0.655 / 0.805 ms; blocks of 4-8 channels are slower again (segment
//   load/store overhead), the L1-sized choice is within 5% of the best block size tried.
//   Without blocking the cost per nonzero per 96 positions grew from 3.75 ns (8 channels) to 8.9 ns
//   (256 channels) at a fixed nonzero count per row.
// * Offsets depend on the input size: computed once per (H, W) by sparse_conv2d_offsets and cached
//   by vpns_fast.sparse_cpu.SparseConv2d, so the per-call work is the plane copy and the FMAs.
// * Threads (parallel_items: each works through its own share, then takes what others left) over items of
//   (output-row block, image, chunk of position tiles), >= 4 items per thread, each tile computed for every
//   row of its block and written out (epilogue) before the next: rows are split last, only when images and
//   tiles give too few items (one 7x7 plane is one tile) or a block's nonzeros would not fit in 256 KiB of L2. At batch
//   >= 2 x threads an item is a whole image whose planes its thread builds in its own scratch, and 1x1
//   stride-1 unpadded convs read their input in place. Measured 2026-12-03 on the AVX-512 EPYC (2
//   threads, density 0.1, medians of 9 interleaved rounds at batch 1, 3 at batch 32; per layer against
//   the previous split over (image, block of <= 16 channels) with batch-wide planes): batch 1, 3x3
//   layers 0.90-1.05x (no change), 1x1 convs reading in place 0.44-0.49x (64x256 @56, 128x512 @28),
//   all 11 ResNet layer shapes 5.82 -> 5.06 ms; batch 32: 3x3 0.52-0.92x, 1x1 0.16-0.43x, total
//   324 -> 139 ms (with the activation cache of csrc/buffers.cpp: the 103 MB outputs no longer fault
//   in fresh pages).
// * 1x1 stride-1 convs read their input in place at any H * W: where a tile's whole last vector would reach past
//   the input's storage (the last image) it is a masked load, so nothing past the input is read (at 14x14 and 7x7 they
//   copied the input into planes and swept 196 positions in 3 tiles). 2 threads, batch 1, density 0.1,
//   medians of 9 interleaved rounds against the copy: 256x1024 @14 0.52x, 1024x256 @14 0.84x,
//   2048x512 @7 0.84x, 512x2048 @7 0.74x; ResNet-50 end to end 22.9 -> 21.6 ms (p20-p80 of the
//   per-round ratio 1.02-1.10x). Tried with it, not kept: 13-vector tiles (196 positions in 2 passes
//   instead of 3): 0.96-1.14x per layer, 1.03x in total, i.e. slower.
// * Tried, not kept (2 threads, 10% kept unless said; end to end: interleaved rounds of one model):
//   - 1x1 stride-1 convs at batch 32 with the batch's pixels as one row of positions (the input copied
//     channel-major, [C_in, N * H * W]: every tile full and every load aligned; outputs written back per image
//     by the epilogue), 2-core AMD EPYC, 2026-12-04, medians of 9 interleaved calls, ResNet-50's shapes. The
//     kernel alone on an input already laid out that way: 256 -> 1024 at 14x14 1.55x, 512 -> 2048 at 7x7 1.93x,
//     the reducing 1024 -> 256 / 2048 -> 512 1.00x / 1.07x. With the copy and the per-image epilogue: 0.84x and
//     0.96x (the per-image runs cannot be streamed, 784-byte planes start mid-line), 1.08x and 1.28x with plain
//     stores there, 0.78x / 0.85x reducing: about 7 ms of ResNet-50's 480 at best. Then (2026-12-05) activations
//     kept channel-major between layers: every sparse conv read only by sparse convs wrote [C, N, H, W] storage, 1x1
//     stride-1 convs read it as one image of N * H rows, the others built their planes from it. Against the aligned
//     outputs that had come since, 2 threads, batch 32, medians of 9 interleaved calls (2-core AMD EPYC, AVX2): only
//     the expanding 1x1 convs gained (256 -> 1024 at 14x14 1.04x, 512 -> 2048 at 7x7 1.07x); 1x1 convs at 56x56 and
//     28x28 0.84-0.93x, reducing ones at 14x14 and 7x7 0.86x / 0.94x, 3x3 0.98-0.99x, stride-2 1x1 0.82-0.84x
//     (planes gathered from channels N * H * W apart). ResNet-50 end to end 0.92x at batch 32, 0.93x at 8, ResNet-18
//     0.94x (bench/results/cpu-channel-major-ab-2026-12-05-amd-scratch.txt); removed;
//   - 3x3 convs at batch 32 over planes of 8 images interleaved element by element ([C, H+2, (W+2) * 8]: every
//     tap's load aligned, no straddled cache line), emulated with this kernel as a dilation (1, 8) conv on such an
//     input, 2 threads, 10% kept, medians of 9 alternating calls, 2-core AMD EPYC, 2026-12-04: 64 @56 0.88x,
//     128 @28 0.86x, 256 @14 1.06x, 512 @7 0.90x, before the cost of interleaving the input. A tile of 12
//     positions x 8 images needs 2 rows more of window per channel (fewer channels an L1 block at 56x56), and even
//     at 7x7, where the window is small, the aligned loads did not pay: the 1.4x of aligned tiles in L1 (below)
//     is not what bounds a whole layer;
//   - the epilogue done by the tile kernel on the last input-channel block of 1x1 convs, storing straight
//     into the output: ResNet-50 1.00x at batch 1 (12 rounds), 0.98x at batch 32 (8 rounds); its cost is
//     the output and residual traffic, which stays;
//   - a thread-local scratch kept between calls: ResNet-50 / ResNet-18 at batch 32 1.01x / 0.97x (16 rounds);
//   - batch 1, 12-14 rounds: tile runs shrinking towards the end of each row block (guided) ResNet-18 1.04x,
//     ResNet-50 0.97x; the first input-channel block's sums started at zero instead of zero-filled ResNet-50
//     1.01x, ResNet-18 at 5% 0.99x; prefetching each tile's output and residual lines 0.99x at 5% kept (the next tile's
//     are requested now, at every batch, measured at batch 32: prefetch_floats);
//   - an aligned plane layout (rows padded to a multiple of 8 floats, one copy of each plane per column
//     shift of the taps, so every load of a 3x3 tap is aligned). In L1 an aligned 12-vector tile runs at
//     90-98 GFLOP/s on one core against 64-68 unaligned, but per layer it was 0.95-1.14x the time at 14x14
//     (same rows, 3 copies: a third of the channels per L1 block) and 1.2-3.7x at 56x56 (rows of 64 floats).
//   - 2026-12-07, 2-vCPU Intel Xeon, batch 1 (bench/results/cpu-tried-not-kept-2026-12-07-intel-xeon.txt): two output
//     rows summed at once over tiles of at most 6 vectors (a 7x7 plane is 4: 8 chains of FMAs rather than 4, each row
//     in its own order, the same bits): alone 1.07-1.08x at 7x7 on aligned input (in a fixed order that favoured it;
//     0.96-1.04x on NCHW input), inside ResNet-50 at 10% kept layer4 0.99-1.07x and the whole call 0.996x; an item's
//     rows swept in groups whose sums take 8-24 KiB (every input-channel block for one group, then the next), so that
//     the sums stay in L1 beside the window: 0.28-1.03x alone (each group reads the windows again); the sums' rows in
//     the scratch as far apart as the call's tile (64 floats at 7x7) rather than 224, with or without 16 floats more
//     against 4 KiB aliasing: 0.99-1.01x.
// * Measured (2 threads, batch 1, medians, load 0.4-1.4), per layer dense oneDNN -> this kernel:
//   density 0.1: 3x3 stride 1 3.6-4.2x, 3x3 stride 2 2.4-3.3x, 1x1 stride 2 2.5-3.3x, conv1 7x7/2
//   2.7x; density 0.05: 2.9-6.6x; density 0.5: 0.87-1.11x on 3x3 (the measured fallback keeps the
//   slower ones dense), 1.5-1.8x on 1x1. torch.sparse CSR + unfold is 1.4-7.3x slower than this
//   kernel on every layer and density measured. End to end ResNet-18 @224, measured fallback:
//   batch 1, density 0.1: 32.2 -> 10.6 ms (3.0x images/s), density 0.05: 34.5 -> 8.2 ms (4.2x);
//   batch 32: 893 -> 312 ms (2.9x) and 854 -> 226 ms (3.8x). These include vpns_fast.sparse_cpu's
//   SeparableMaxPool2d (torch 2.14's eval-mode maxpool costs 3.4 ms at batch 1, it 0.8 ms);
//   against dense with that pool too: 2.8x / 3.6x at batch 1. Global-magnitude masks of random-init
//   weights (early layers kept ~50% dense): 2.0x at 0.1, 2.6x at 0.05.
// * Sparse linear: CSR; batch >= 8 runs the same tile kernel with the batch as the vector
//   dimension (transposed input; see batch_as_vectors), smaller batches a gathered dot product per output
//   (csrc/gathered_rows.cpp, with the measurements).
#include "activation.h"
#include "vpns_ops.h"

#include <ATen/Parallel.h>
#include <ATen/core/grad_mode.h>

#include <c10/util/SmallVector.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define VPNS_X86 1
#else
#define VPNS_X86 0
#endif

namespace {

constexpr int kLanes = 8;  // floats per AVX2 vector; the scalar path keeps the same tile layout
// Output positions per register tile = kMaxVectors * kLanes.
constexpr int kMaxVectors = 12;
constexpr int64_t kTile = kMaxVectors * kLanes;
// Vectors of the AVX-512 kernel's widest tile (wide_tiles, wide_tile_vectors), and those positions: the stride of the
// sums' rows and the slack past an image's planes.
constexpr int kMaxWideVectors = 14;
constexpr int64_t kWideTile = kMaxWideVectors * 16;
// Bytes of input tile a channel block may occupy (L1d is 32 KiB on the machines measured).
constexpr int64_t kL1Budget = 24 * 1024;
// Bytes of a row block's nonzeros, and of its accumulators, kept in L2 (1 MiB a core measured).
constexpr int64_t kRowBlockBytes = 256 * 1024;
// Nonzeros a row should have within one input-channel block (see sparse_conv2d_offsets).
constexpr double kRowBlockNonzeros = 12.0;
// 1x1 convolutions whose output has at least this many bytes write it with non-temporal (streaming) stores,
// whole 64-byte lines straight to memory, where a plain store that misses the cache first reads its line (the
// read-for-ownership). The epilogue writes a short run (one tile) into each of hundreds of output channels in
// turn; that the hardware prefetchers lose track of so many streams is the likely reason the plain stores did
// so badly here, not confirmed (this KVM guest exposes no performance counters). 2-vCPU Intel Xeon (AVX-512),
// 2 threads, 10% kept, batch 32, with residual and ReLU, medians of 9 alternating calls (2026-12-04): 64 -> 256
// at 56x56 25.5 -> 11.6 ms, 128 -> 512 at 28x28 11.9 -> 5.6 ms, 256 -> 1024 at 14x14 6.1 -> 5.7 ms, 256 -> 64
// at 56x56 9.5 -> 6.6 ms. Whole networks (per-round ratios over 5 interleaved rounds, p20-p80): ResNet-50
// batch 32 1.22x (1.21-1.23x), batch 8 1.10x (1.10-1.11x), batch 1 1.01x (nothing that large); MobileNetV2
// batch 32 1.20x (1.20-1.20x); ResNet-18 batch 32 1.00x (0.99-1.01x: its only 1x1 convs are the downsamples).
// With the AVX2 kernel on the same machine: ResNet-50 batch 32 1.16x (1.16-1.18x), batch 8 1.06x (1.05-1.06x).
// Not streamed:
// - smaller outputs, which the next layer finds in cache: every 1x1 output streamed made ResNet-50 at batch 1
//   0.945x as fast (every conv output: ResNet-18 0.92x); 16 MiB rather than 8 gave ResNet-50 at batch 8 1.08x instead
//   of 1.10x;
// - the other convolutions (3x3, the 7x7 stem), which do 9-49 times a 1x1's work per output value at the same
//   density and are not bound by their stores: streamed too, ResNet-18 at batch 32 ran 0.96x as fast, its 3x3
//   layers at 56x56 and 28x28 3-15% slower each (ResNet-50's 0-11%), ResNet-50's stem 16.7 -> 19.4 ms and the
//   max pooling after it 8.4 -> 10.1 ms (its input no longer in cache).
// Tried, not kept (medians of 15 calls; the prefetch in two processes each): prefetching each tile's residual
// lines before its rows, 1.01-1.08x at 56x56 but 0.97-1.01x at 28x28 and 14x14 (the next tile's, requested during
// this tile's epilogue, are kept: prefetch_floats); output channels in blocks of 16, each
// over all tiles (fewer streams at once): without streaming 1.9x at 56x56 but 0.66x at 14x14, with it 1.06x at 56x56
// and 0.64x at 28x28. (set_streamed_output_bytes changes it: tests force both paths, benchmarks compare them.)
constexpr int64_t kStreamOutputBytes = int64_t{8} << 20;
// A call told that nothing reads its residual afterwards (residual_reusable) writes its output into the residual when
// the output has at least this many bytes (and is not streamed): each line is then read once and written back, where a
// new output's line is first fetched from wherever it lies (the read-for-ownership) as well. Below it the new output
// wins: the engine's recycled buffer of that size is still in this core's cache from the previous call, the residual
// often in the other core's. 2-vCPU Intel Xeon (AVX-512, L2 2 MiB a core), 2 threads, each step timed inside the call,
// rounds alternating in one process (bench/results/cpu-in-place-residual-ab-2026-12-08-intel-xeon.txt): ResNet-50 at
// 5% kept, batch 1, the 64 -> 256 1x1 layers at 56x56 (3.2 MB outputs) 0.31 -> 0.22 ms, 128 -> 512 at 28x28 (1.6 MB)
// 1.08-1.20x, the call 1.048x (12 of 12 rounds); at 10% kept 1.027x; batch 8 1.004x (its 6.4 MB layers 1.15-1.27x);
// without the threshold, 256 -> 1024 at 14x14 (0.8 MB) at batch 1 0.84-0.90x. (set_in_place_residual_bytes changes
// it: tests force both paths, benchmarks compare them.)
constexpr int64_t kInPlaceResidualBytes = int64_t{1} << 20;
// Whether the AVX-512 kernel runs tiles of up to 12-14 zmm vectors (kWideTile, even_tile); on by default.
std::atomic<bool>& wide_tiles() {
  static std::atomic<bool> enabled{true};
  return enabled;
}
// The most vectors an AVX-512 tile may take where that cuts a plane into fewer tiles without more vectors in all
// (even_tile); kMaxWideVectors by default, 12 the earlier limit.
std::atomic<int>& wide_tile_vectors() {
  static std::atomic<int> vectors{kMaxWideVectors};
  return vectors;
}
// Whether rows_at_tile requests the next tile's output and residual lines (prefetch_floats); on by default.
std::atomic<bool>& next_tile_prefetch() {
  static std::atomic<bool> enabled{true};
  return enabled;
}

// Planes of at most this many bytes (all images of a call of fewer than 2 images a thread) are built by every thread
// in its own buffer (thread_planes) rather than once and shared. Why: a thread that reads planes another thread has
// just written (the shared way: each thread fills a share of the channels, then reads every channel) waits for each
// of those cache lines in turn, since a tile reads a short window of each channel, which the hardware prefetchers
// do not follow. Where the two cores share an L3 that wait is short; where they do not, it is the cost of the call.
// The 2-vCPU KVM guest measured (AMD EPYC, Zen 4) finds its vCPUs either way (core_round_trip_ns: 50-110 ns or
// 310-360 ns), the host moving them every few seconds to minutes. Measured with 2 threads only: with more, each
// thread still copies every plane (T copies, T x the threshold of cache), which may not pay. Built privately, the other
// thread's lines are read once, in order (its output, by the copy), and the buffer is written by the same thread each
// call. bench/results/cpu-private-planes-ab-2026-12-05-amd.txt (2 threads, batch 1, 10% kept, rounds grouped by the
// round trip; the layers with every plane private whatever its size), shared -> private, cores apart / sharing the L3:
// 128 -> 256 3x3 stride 2 at 28x28 (460 KB of planes) 0.747 -> 0.249 / 0.266 -> 0.229 ms; 256 -> 256 3x3 at 14x14
// (262 KB) 0.590 -> 0.323 / 0.339 -> 0.305 ms; 64 -> 64 3x3 at 56x56 (861 KB) 0.558 -> 0.332 / 0.322 -> 0.320 ms;
// ResNet-18 1.162x / 1.016x, ResNet-50 1.068x / 1.000x.
// 512 KiB rather than 1 MiB, in a scratch A/B of the same kind (17-208 rounds): sharing the L3, each thread copying
// ResNet-18's 861 KB planes at 56x56 cost more than it saved (ResNet-18 0.947x with 1 MiB, 0.983x with 512 KiB;
// cores apart 1.208x and 1.157x; ResNet-50 0.979x / 0.998x and 1.062x / 1.055x).
// Since 2026-12-06, with two threads or more, planes of up to twice this are private too, and each thread fills only
// the rows its share of output positions reads (the position bands in sparse_conv2d_with); every thread filling all
// of them, as above, remains the one-thread path. The figures above are the earlier way's.
constexpr int64_t kPrivatePlanesBytes = int64_t{512} << 10;
std::atomic<int64_t>& private_planes_bytes() {
  static std::atomic<int64_t> bytes{kPrivatePlanesBytes};
  return bytes;
}

std::atomic<int64_t>& streamed_output_bytes() {
  static std::atomic<int64_t> bytes{kStreamOutputBytes};
  return bytes;
}
std::atomic<int64_t>& in_place_residual_bytes() {
  static std::atomic<int64_t> bytes{kInPlaceResidualBytes};
  return bytes;
}
// After a thread's streaming stores, before another thread reads what they wrote: they are weakly ordered.
inline void store_fence() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_sfence();
#endif
}

// The vector kernel the sparse layers run: by default the widest the CPU has (AVX-512, else AVX2, else the portable
// one); set_sparse_kernel_isa (tests check every path on one machine; benchmarks compare them in one process) or
// VPNS_FAST_SPARSE_ISA=scalar|avx2|avx512 before the first call chooses another the CPU has. The dense 1x1 kernel and
// Winograd's transforms follow the same choice (avx512_kernels_chosen). Measured, AVX-512 against AVX2, 2 threads:
// - Intel Xeon (2 vCPUs), 10% kept, 6-zmm tiles: ResNet-18 1.13x, ResNet-50 1.10x at batch 1 (2026-12-04).
// - AMD Zen 5 (family 0x1A), 10% kept, 6-zmm tiles: 1.10x (ResNet-18), 1.12x (ResNet-50) at batch 1, 1.11x
//   (ResNet-18) at batch 32, per layer 0.96-1.33x (2026-12-05, bench/results/cpu-sparse-isa-2026-12-05-amd-zen5.jsonl).
// - AMD Zen 4 (family 0x19, model 0x11: documented to run 512-bit operations as two 256-bit halves), once the tiles
//   had grown to 12 zmm (kWideTile): the same network both ways in one process, rounds grouped by the vCPUs'
//   placement (shared L3 / apart; bench/results/cpu-sparse-isa-networks-ab-2026-12-06-amd-zen4-scratch.txt): ResNet-50
//   at 5% kept 1.042x / 1.011x at batch 1 and 1.084x / 1.080x at batch 32, at 10% 1.043x / 1.020x, at 50% (its dense
//   layers' kernels too) 1.069x / 1.089x; ResNet-18 1.016-1.024x at batch 1 but 0.991x / 0.985x at 10% and batch 32;
//   MobileNetV2 1.030x / 1.039x. Per layer (bench/results/cpu-sparse-isa-2026-12-06-amd-zen4.jsonl, batch 1, 10%
//   kept) 1.04-1.25x on the stride-1 layers at 56x56 and 28x28, 0.89-1.11x on the stride-2 ones into 28x28,
//   0.95-1.19x on 14x14 outputs but 0.87x on the 1024 -> 512 1x1, 0.88-0.99x on the last stage's 7x7 outputs (a 1x1
//   or stride-2 layer's 49 positions are 4 zmm vectors, 64 lanes, against 7 ymm, 56; the padded 3x3s 0.95-0.96x). With
//   6-zmm tiles Zen 4 had measured 0.97x (ResNet-18) and 1.00x (ResNet-50) at 10% kept (2026-12-03), and AVX2 stayed
//   its default until then.
// Zen 5's laptop parts are documented to split 512-bit operations as Zen 4 does; none was measured.
// The ISAs are the indices of kIsas (below, with their kernels), narrowest first.
enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
constexpr int kIsaCount = 3;

Isa widest_isa() {
#if VPNS_X86
  if (__builtin_cpu_supports("avx512f")) return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kScalar;
}

Isa default_isa() { return widest_isa(); }

// VPNS_FAST_SPARSE_ISA as it was at the first sparse call (nullopt: unset); read here only, once, and copied
// (a later setenv may free the string getenv returned).
const std::optional<std::string>& isa_environment() {
  static const std::optional<std::string> wanted = []() -> std::optional<std::string> {
    const char* value = std::getenv("VPNS_FAST_SPARSE_ISA");
    return value ? std::optional<std::string>(value) : std::nullopt;
  }();
  return wanted;
}

int isa_index(const std::string& name);

std::atomic<int>& chosen_isa() {
  static std::atomic<int> chosen([] {
    const std::optional<std::string>& wanted = isa_environment();
    const int index = wanted ? isa_index(*wanted) : -1;
    return index >= 0 ? std::min(index, static_cast<int>(widest_isa())) : static_cast<int>(default_isa());
  }());
  return chosen;
}

Isa sparse_isa() { return static_cast<Isa>(chosen_isa().load(std::memory_order_relaxed)); }

int64_t round_up(int64_t value, int64_t multiple) { return (value + multiple - 1) / multiple * multiple; }

// body(item, scratch) for every item in [0, total) on the intra-op threads, each thread taking the next
// item when it finishes one, with its own scratch of scratch_floats floats. Dynamic rather than
// at::parallel_for's equal halves: rows of an unstructured mask differ in nonzeros, and on a shared
// machine one vCPU is often descheduled for a while; with equal halves every layer then waits for the
// stalled thread (ResNet-18, 10% kept, batch 1, 2 threads: the engine took 11-16 ms per image in noisy
// periods where it took 8.4 ms in quiet ones, while ONNX Runtime moved from 17.4 to 21 ms). Measured in
// such a period, 3 alternating runs each: median 14.3-16.0 ms with equal halves, 10.9-12.7 ms with this.
// Each worker starts on its own contiguous share of the items and then takes what is left of the others':
// the same thread then computes the same rows or positions in consecutive layers and calls, so more of
// what it reads is still in its own L2. Against one shared counter (2 threads, 10% kept, per-round ratios
// of 16 interleaved rounds, p20-p80): batch 1 ResNet-50 1.045x (1.04-1.13x), ResNet-18 1.11x (1.09-1.14x);
// batch 32 ResNet-50 1.03x (1.03-1.04x). Ordering the items so that the shares split positions rather than
// output channels was slower: ResNet-50 0.97x, ResNet-18 0.99x.
struct alignas(64) ItemRange {
  std::atomic<int64_t> next{0};
  int64_t end = 0;
};

// Buffers of floats on 64-byte boundaries (a cache line, two AVX2 vectors). new float[] gives 16 (glibc's large
// chunks start 16 bytes into a page), so planes whose channels are whole vectors apart (aligned_plane_stride) would
// still load across lines, and the tiles' sums (`wide`, 12 vectors a row loaded and stored around every run) too.
// Two builds in alternating processes, with the strided 1x1 planes below
// (bench/results/cpu-aligned-buffers-two-builds-2026-12-05-amd.txt: 2-core AMD EPYC, 2 threads, 10% kept, batch 32,
// before / after per process pair): 256 -> 1024 1x1 at 14x14 1.096-1.130x (only the sums moved), 256 -> 256 3x3 at
// 14x14 1.048-1.055x, 128 -> 128 3x3 stride 2 at 28x28 1.063-1.135x, 64 -> 64 3x3 at 56x56 1.000-1.017x; ResNet-50
// 1.015-1.105x (three pairs; at batch 1 the vCPUs' placement moved the times more than the change).
struct AlignedDelete {
  void operator()(float* data) const { ::operator delete[](data, std::align_val_t{64}); }
};
using AlignedFloats = std::unique_ptr<float[], AlignedDelete>;

AlignedFloats aligned_floats(int64_t count) {
  const size_t bytes = static_cast<size_t>(std::max<int64_t>(1, count)) * sizeof(float);
  return AlignedFloats(static_cast<float*>(::operator new[](bytes, std::align_val_t{64})));
}

// `start()` runs on each thread that takes part before its first item: once per chunk of at::parallel_for (with
// OpenMP, once per thread).
template <typename Start, typename Body>
void parallel_items(int64_t total, int64_t scratch_floats, const Start& start, const Body& body) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), total));
  std::vector<ItemRange> ranges(static_cast<size_t>(workers));
  for (int64_t w = 0; w < workers; ++w) {
    ranges[w].next = total * w / workers;
    ranges[w].end = total * (w + 1) / workers;
  }
  at::parallel_for(0, workers, 1, [&](int64_t begin, int64_t end) {
    start();
    // uninitialised: every user writes its scratch before reading it (zero-filling megabytes of planes per
    // call would cost a pass over them)
    const AlignedFloats scratch = aligned_floats(scratch_floats);
    for (int64_t w = begin; w < end; ++w) {
      for (int64_t v = 0; v < workers; ++v) {
        ItemRange& range = ranges[(w + v) % workers];
        for (int64_t item = range.next++; item < range.end; item = range.next++) body(item, scratch.get());
      }
    }
  });
}

template <typename Body>
void parallel_items(int64_t total, int64_t scratch_floats, const Body& body) {
  parallel_items(total, scratch_floats, [] {}, body);
}

// This thread's buffer for the planes it builds for itself (kPrivatePlanesBytes), at least `floats` long. Kept for the
// thread's life, so that the same thread writes the same lines call after call: they stay in its own cache, and no
// other core holds a copy that a write must first invalidate. It never shrinks: as large as the largest planes a call
// on this thread built privately (at most the threshold in force then, twice it with two threads or more; 512 KiB by
// default). Zeroed when allocated: the position bands fill only the rows a thread's items read, and a call given
// offsets made for another input size (which pass the range check) then reads zeros or this thread's earlier planes,
// never memory no call wrote.
struct ThreadPlanes {
  AlignedFloats buffer;
  int64_t floats = 0;
};

ThreadPlanes& this_thread_planes() {
  thread_local ThreadPlanes planes;
  return planes;
}

float* thread_planes(int64_t floats) {
  ThreadPlanes& own = this_thread_planes();
  if (own.floats < floats) {
    own.buffer.reset();
    own.floats = 0;  // a throwing allocation leaves no stale size behind
    own.buffer = aligned_floats(floats);
    std::fill(own.buffer.get(), own.buffer.get() + floats, 0.0f);
    own.floats = floats;
  }
  return own.buffer.get();
}

// ---- the one inner kernel: rows of a sparse matrix times shifted windows of a dense panel -------
// out[r][p] = sum_{k in row r} values[k] * src[offsets[k] + p] for p in [0, positions), written over whatever `out`
// held: each row's first channel block starts its sums from zero, later blocks add to them. (Until 2026-12-05 the
// callers zero-filled `out` for every tile and the first block loaded those zeros. One thread, 10% kept, ReLU, the
// two builds in alternating processes, bench/results/cpu-first-block-sums-two-builds-2026-12-05-amd.txt: 1x1 layers
// 0.99-1.12x at batch 1 and 0.99-1.10x at batch 8, 64 -> 256 at 56x56 with a residual the most; 3x3 layers
// 1.00-1.03x; the per-pair ratios at batch 8 spread widely, 2048 -> 512 at 7x7 0.80-1.08x.)
// Used by the convolution (src = phase planes of the padded input, p = flattened output position) and by the
// linear layer (src = transposed input, p = batch index). Positions go `tile` at a time (whole vectors, at most
// kWideTile with the AVX-512 kernel, kTile with the others; a convolution passes one of its even tiles, see
// even_tile, the linear layer kTile). `out` rows are `out_stride` apart, at least the tile rounded up to whole
// vectors (a tile's vectors are stored whole). With `exact` false, src must be readable up to a tile past every
// window (tiles read whole vectors); with `exact` true nothing past src[offsets[k] + positions) is read (the last,
// partial vector is a masked load), so a convolution can read its input in place.

// Where row r's nonzeros of input-channel block j start in `segments` (and in offsets/values): entry
// r * row_step + j * block_step, ending where the next entry starts. Row-major (row_step = blocks, block_step
// = 1): a row's blocks one after another (the linear layer). Block-major (row_step = 1, block_step = rows): a
// block's rows one after another (the convolution, sparse_conv2d_offsets), so that the rows of a work item read
// their nonzeros of one block as one sequential run. Why: with the rows' segments a row apart, a layer of one
// position tile (7x7 planes: every nonzero read once) streams its weight in hundreds of short runs the hardware
// prefetchers do not follow. ResNet-50 layer4 at 10% kept, batch 1, 2 threads, caches flushed before each
// call, 15 interleaved rounds: one block per row (the same sequential order) 0.83 / 0.24 / 0.58 ms against
// 0.98 / 0.30 / 0.68 ms with 23 / 18 / 9 blocks (layer4.0.conv2, layer4.1.conv1, layer4.0.downsample.0).
// Block-major against row-major end to end, both builds in one process, interleaved rounds (2-core AMD EPYC,
// 2 threads, 10% kept, every conv sparse; a noisy afternoon, bench/results/cpu-block-major-2026-12-04-amd.txt):
// batch 1 ResNet-50 1.085x / 1.059x (two runs of 12 / 16 rounds; p20-p80 0.95-1.16x), ResNet-18 1.081x
// (1.00-1.20x); batch 32 ResNet-18 1.022x (0.98-1.08x), ResNet-50 1.029x (1.02-1.03x).
// `blocks`: input-channel blocks a row's nonzeros are split into; row r's run for block j is
// segments[at(r, j)] .. segments[at(r, j) + 1].
struct SegmentLayout {
  int64_t row_step, block_step, blocks;
  int64_t at(int64_t r, int64_t j) const { return r * row_step + j * block_step; }
};

inline SegmentLayout row_major(int64_t blocks) { return {blocks, 1, blocks}; }
inline SegmentLayout block_major(int64_t rows, int64_t blocks) { return {1, rows, blocks}; }

// Input lines to request ahead of use, for a panel read in place from a tensor that is not in cache (a 1x1
// conv's input): the window of input channel c for the tile at src is src + c * channel_stride, `width` floats.
// While one channel block's rows run, the next block's window (or the next tile's first block) is prefetched,
// a few lines per row. channel_stride == 0: none. Why: such a window is one short run per channel, hundreds of
// streams that the hardware prefetchers do not follow; at batch 32 every image's input comes from memory.
// ResNet-50, 10% kept, 2 threads, per-round ratios of 8 interleaved rounds: batch 32 1.048x (p20-p80
// 1.005-1.069x), batch 1 1.016x (0.96-1.06x). Tried with it, not kept: prefetching the epilogue's output
// and residual lines during the first block, batch 32 0.99x (0.92-1.05x; the next tile's lines during this tile's
// epilogue pay: prefetch_floats); the next rows' nonzeros, batch 1
// 1.01x (0.93-1.08x).
// next_tile_width: positions of the tile the work item computes after a call's last tile (0: none), which starts one
// tile width after it.
struct InputPrefetch {
  int64_t channel_stride = 0, block_channels = 0, channels = 0, next_tile_width = 0;
};

#if VPNS_X86
// kMasked: the last vector loads only the lanes set in `last` (positions past the window are not read). kFirst: the
// sums start from zero rather than from `out` (a row's first channel block).
template <int NV, bool kMasked, bool kFirst>
__attribute__((target("avx2,fma"))) inline void tile_avx2(const float* src, const int32_t* offsets, const float* values,
                                                          int64_t count, float* out, int64_t width) {
  const __m256i last = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(width % kLanes)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256 acc[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) acc[v] = kFirst ? _mm256_setzero_ps() : _mm256_loadu_ps(out + v * kLanes);
  for (int64_t k = 0; k < count; ++k) {
    const float* p = src + offsets[k];
    const __m256 w = _mm256_broadcast_ss(values + k);
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const __m256 x =
          kMasked && v == NV - 1 ? _mm256_maskload_ps(p + v * kLanes, last) : _mm256_loadu_ps(p + v * kLanes);
      acc[v] = _mm256_fmadd_ps(w, x, acc[v]);
    }
  }
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(out + v * kLanes, acc[v]);
}

// body(std::integral_constant<int, V>()) with V = vectors, in [1, kMax]: a tile's vector count as a constant.
template <int kMax, typename Body>
inline void with_vector_count(int64_t vectors, const Body& body) {
  if constexpr (kMax > 1) {
    if (vectors < kMax) return with_vector_count<kMax - 1>(vectors, body);
  }
  body(std::integral_constant<int, kMax>());
}

// body(std::bool_constant<flag>()): a runtime flag as a constant.
template <typename Body>
inline void with_flag(bool flag, const Body& body) {
  if (flag) {
    body(std::true_type());
  } else {
    body(std::false_type());
  }
}

// `width` positions (1..kTile; wider tiles are the AVX-512 kernel's) from src to out; kMasked: width % 8 != 0 and the
// last vector's lanes past the window are not read; `first`: out is overwritten rather than added to.
template <bool kMasked>
__attribute__((target("avx2,fma"))) void tile_avx2_any(int64_t width, const float* src, const int32_t* offsets,
                                                       const float* values, int64_t count, float* out, bool first) {
  with_vector_count<kMaxVectors>((width + kLanes - 1) / kLanes, [&](auto vectors) {
    with_flag(first, [&](auto starts) {
      tile_avx2<decltype(vectors)::value, kMasked, decltype(starts)::value>(src, offsets, values, count, out, width);
    });
  });
}

// The same tile with 16-lane vectors: 96 positions are 6 zmm accumulators, one load and one FMA per vector
// and nonzero as in the AVX2 tile, so half the instructions for the same positions. The loads bound it:
// 15 of 16 unaligned 64-byte loads straddle two cache lines, so it gains 1.04-1.14x per 3x3 layer on the
// Intel Xeon measured (see default_isa), not 2x. On Zen 5 this tile gained 0.96-1.33x per layer, 1.10-1.12x end to
// end. AMD's Zen 4 splits 512-bit FMAs in halves: there the 6-zmm tile measured 0.97-1.00x the AVX2 one end to end
// (2026-12-03); three days later, with tiles of up to 12 zmm (192 positions, even_tile) and every other change since,
// 0.99-1.09x (default_isa; which change made the difference was not measured). Other Intel CPUs are not measured.
constexpr int kWideLanes = 16;

// Every loop over the NV accumulators unrolled whole (16 >= the widest tile's 14), so they stay in registers: with
// `unroll 8` GCC kept tiles of 9-12 vectors' accumulators on the stack, a load and a store around every FMA.
template <int NV, bool kMasked, bool kFirst>
__attribute__((target("avx512f"))) inline void tile_avx512(const float* src, const int32_t* offsets,
                                                           const float* values, int64_t count, float* out,
                                                           int64_t width) {
  const __mmask16 last = static_cast<__mmask16>((1u << (width % kWideLanes)) - 1u);
  __m512 acc[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) acc[v] = kFirst ? _mm512_setzero_ps() : _mm512_loadu_ps(out + v * kWideLanes);
  for (int64_t k = 0; k < count; ++k) {
    const float* p = src + offsets[k];
    const __m512 w = _mm512_set1_ps(values[k]);
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      const __m512 x = kMasked && v == NV - 1 ? _mm512_maskz_loadu_ps(last, p + v * kWideLanes)
                                              : _mm512_loadu_ps(p + v * kWideLanes);
      acc[v] = _mm512_fmadd_ps(w, x, acc[v]);
    }
  }
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out + v * kWideLanes, acc[v]);
}

// As tile_avx2_any, with kMasked: width % 16 != 0.
template <bool kMasked>
__attribute__((target("avx512f"))) void tile_avx512_any(int64_t width, const float* src, const int32_t* offsets,
                                                        const float* values, int64_t count, float* out, bool first) {
  static_assert(kWideTile == kMaxWideVectors * kWideLanes, "a tile is at most kMaxWideVectors zmm vectors");
  with_vector_count<kMaxWideVectors>((width + kWideLanes - 1) / kWideLanes, [&](auto vectors) {
    with_flag(first, [&](auto starts) {
      tile_avx512<decltype(vectors)::value, kMasked, decltype(starts)::value>(src, offsets, values, count, out, width);
    });
  });
}

// Walks the lines of one channel block's window, `per_step` prefetches a step.
struct WindowPrefetcher {
  const char* base = nullptr;
  int64_t stride_bytes = 0, line_count = 0, channel_end = 0, channel = 0, line = 0, per_step = 0;
  void start(const float* src, const InputPrefetch& p, int64_t channel_begin, int64_t width, int64_t steps) {
    base = reinterpret_cast<const char*>(src);
    stride_bytes = p.channel_stride * 4;
    line_count = (width * 4 + 63) / 64 + 1;  // the window need not start on a line
    channel = channel_begin;
    channel_end = std::min(p.channels, channel_begin + p.block_channels);
    line = 0;
    per_step =
        channel < channel_end ? ((channel_end - channel) * line_count + steps - 1) / std::max<int64_t>(1, steps) : 0;
  }
  void step() {
    for (int64_t i = 0; i < per_step && channel < channel_end; ++i) {
      _mm_prefetch(base + channel * stride_bytes + line * 64, _MM_HINT_T1);
      if (++line == line_count) {
        line = 0;
        ++channel;
      }
    }
  }
};

// Requests the cache lines of base[lo, hi) into L2. rows_at_tile does it for the output and residual lines of the tile
// an item computes next, while the current tile's epilogue runs (set_next_tile_prefetch turns it off): a tile's
// epilogue reads up to 96 floats (384 bytes; up to 224 with wide tiles) of each of hundreds of output channels'
// residual planes and writes as many into the output, hundreds of streams too short for the hardware prefetchers to
// follow, so each line was a demand miss. Measured by `python -m bench.prefetch_ab`
// (bench/results/cpu-prefetch-ab-2026-12-05-amd.txt: 2-core AMD EPYC, 2 threads, AVX2 kernel, 10% kept, batch 32, bias
// and ReLU fused, medians of 15 alternating calls, off -> on): ResNet-50's 64 -> 256 1x1 conv at 56x56 took 17.6 ms
// with a residual and 6.9 ms without (its 103 MB residual read at about 10 GB/s, where torch.sum read a 400 MB tensor
// at 35 GB/s, a one-off check), 9.7 ms with the residual's lines requested ahead (not the output's: it is streamed);
// 128 -> 512 at 28x28 9.7 -> 6.6 ms; at 14x14 and 7x7 no change (7.7 -> 7.8, 6.3 -> 6.4 ms). A 64 -> 64 3x3 conv at
// 56x56 (output not streamed) 9.8 -> 9.4 ms without a residual, 11.4 -> 10.2 ms with one; 128 -> 128 at 28x28 8.2
// -> 8.1 and 9.2 -> 8.8 ms. Whole networks, per-round ratios off / on in one process (median, p20-p80): ResNet-50 at
// batch 32 1.080x (1.033-1.101x, 10 rounds), ResNet-18 1.026x (1.002-1.041x); at batch 1 (40 rounds) 1.034x
// (0.989-1.051x) and 1.018x (0.974-1.042x). Requesting the current tile's lines instead (before its rows, or during its
// first channel block) did not pay (kStreamOutputBytes, InputPrefetch): they were wanted too soon after; nor did
// requesting the first tile of the item a thread takes next (14x14 and 7x7 layers 0.97-1.09x, one process, not kept).
// Addresses 64 bytes apart and the last one reach every line. (GCC 12 -O3 dropped the whole loop when it
// walked line-aligned addresses made by rounding a pointer down: no prefetch left in the object code.)
inline void prefetch_floats(const float* base, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; i += 16) __builtin_prefetch(base + i, 0, 2);
  if (hi > lo) __builtin_prefetch(base + hi - 1, 0, 2);
}

// Whether the next tile's output lines are requested for writing (prefetch_floats_for_write); on by default.
std::atomic<bool>& output_prefetch_for_write() {
  static std::atomic<bool> enabled{true};
  return enabled;
}

// For prefetch_floats_for_write: whether this CPU reports prefetchw (CPUID 0x80000001, ECX bit 8: PRFCHW); the
// others get read requests.
bool cpu_has_prefetchw() {
#if VPNS_X86
  static const bool has = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid(0x80000001u, &eax, &ebx, &ecx, &edx) != 0 && (ecx & (1u << 8)) != 0;
  }();
  return has;
#else
  return false;
#endif
}

// As prefetch_floats, for lines about to be written: prefetchw brings each line in exclusive, the other core's copy
// invalidated, where a read request brings it shared and the store must then still take it over. At batch 1 both
// threads read every activation (each reads all channels for its positions), so a call's stores find the lines held
// by the other core. bench/results/cpu-output-prefetch-ab-2026-12-05-amd.txt (2-core AMD EPYC, 2 threads, AVX2,
// 10% kept; medians of per-round ratios read request / write request, batch-1 rounds grouped by the cores' round
// trip): batch 1 ResNet-50 1.004x with the cores sharing the L3 (p20-p80 0.997-1.015x), 1.016x apart (1.006-1.034x),
// ResNet-18 1.017x / 1.022x (1.010-1.039x apart); batch 32 ResNet-50 1.028x (1.014-1.034x), ResNet-18 1.017x. A first
// scratch A/B of the same change: 1.008x / 1.016x, 1.015x / 1.019x, batch 32 1.002x / 1.014x. (__builtin_prefetch(p, 1)
// needs the prfchw target to emit it, which GCC 12 did not honour in this file: inline assembly, run only on CPUs
// that report the PRFCHW feature, see cpu_has_prefetchw.)
inline void prefetch_floats_for_write(float* base, int64_t lo, int64_t hi) {
#if VPNS_X86
  for (int64_t i = lo; i < hi; i += 16) asm volatile("prefetchw %0" : : "m"(base[i]));
  if (hi > lo) asm volatile("prefetchw %0" : : "m"(base[hi - 1]));
#else
  prefetch_floats(base, lo, hi);
#endif
}

// Tile outer, then input-channel block, then rows: one tile of one channel block of the input stays in L1
// while every output channel of the work item reads it. kVectorLanes: the tile kernel's vector width.
template <int kVectorLanes,
          void (*kTileMasked)(int64_t, const float*, const int32_t*, const float*, int64_t, float*, bool),
          void (*kTileWhole)(int64_t, const float*, const int32_t*, const float*, int64_t, float*, bool)>
void rows_times_panel_vector(const float* src, const int32_t* offsets, const float* values, const int64_t* segments,
                             SegmentLayout layout, int64_t row_begin, int64_t row_end, int64_t positions, int64_t tile,
                             float* out, int64_t out_stride, bool exact, const InputPrefetch& prefetch) {
  for (int64_t t0 = 0; t0 < positions; t0 += tile) {
    const int64_t width = std::min<int64_t>(tile, positions - t0);
    const bool masked = exact && width % kVectorLanes != 0;
    const float* s = src + t0;
    WindowPrefetcher ahead;
    for (int64_t j = 0; j < layout.blocks; ++j) {
      if (prefetch.channel_stride > 0) {
        if (j + 1 < layout.blocks) {
          ahead.start(s, prefetch, (j + 1) * prefetch.block_channels, width, row_end - row_begin);
        } else {
          const int64_t next_width =
              t0 + tile < positions ? std::min<int64_t>(tile, positions - t0 - tile) : prefetch.next_tile_width;
          ahead.start(s + tile, prefetch, 0, next_width, row_end - row_begin);
        }
      }
      for (int64_t r = row_begin; r < row_end; ++r) {
        ahead.step();
        const int64_t at = layout.at(r, j), b = segments[at], count = segments[at + 1] - b;
        if (count == 0 && j > 0) continue;  // the first block writes the row's sums, zeros if it has no nonzero
        float* o = out + (r - row_begin) * out_stride + t0;
        if (masked) {
          kTileMasked(width, s, offsets + b, values + b, count, o, j == 0);
        } else {
          kTileWhole(width, s, offsets + b, values + b, count, o, j == 0);
        }
      }
    }
  }
}
#endif

// Portable path (any CPU): same tiling, a fixed-width accumulator the compiler vectorizes for
// the baseline instruction set.
void rows_times_panel_scalar(const float* src, const int32_t* offsets, const float* values, const int64_t* segments,
                             SegmentLayout layout, int64_t row_begin, int64_t row_end, int64_t positions, int64_t tile,
                             float* out, int64_t out_stride, bool exact) {
  for (int64_t t0 = 0; t0 < positions; t0 += tile) {
    const int64_t width = round_up(std::min<int64_t>(tile, positions - t0), kLanes);
    // whole vectors, like the AVX2 tile (never past round_up(positions, kLanes)), unless exact
    const int64_t reads = exact ? std::min<int64_t>(tile, positions - t0) : width;
    for (int64_t j = 0; j < layout.blocks; ++j) {
      for (int64_t r = row_begin; r < row_end; ++r) {
        float* o = out + (r - row_begin) * out_stride + t0;
        float acc[kTile] = {};
        if (j > 0) std::memcpy(acc, o, static_cast<size_t>(width) * sizeof(float));
        const int64_t at = layout.at(r, j);
        for (int64_t k = segments[at]; k < segments[at + 1]; ++k) {
          const float* p = src + t0 + offsets[k];
          const float w = values[k];
          for (int64_t i = 0; i < reads; ++i) acc[i] += w * p[i];
        }
        std::memcpy(o, acc, static_cast<size_t>(width) * sizeof(float));
      }
    }
  }
}

// The kernels of each ISA, by Isa index: a new per-ISA kernel is a new member here, chosen with the others.
using RowsTimesPanelFn = void (*)(const float* src, const int32_t* offsets, const float* values,
                                  const int64_t* segments, SegmentLayout layout, int64_t row_begin, int64_t row_end,
                                  int64_t positions, int64_t tile, float* out, int64_t out_stride, bool exact,
                                  const InputPrefetch& prefetch);

struct IsaKernels {
  const char* name;
  RowsTimesPanelFn rows_times_panel;
  int64_t lanes;  // floats a tile reads at once: without `exact`, a window's reads end at a multiple of it
};

void rows_times_panel_portable(const float* src, const int32_t* offsets, const float* values, const int64_t* segments,
                               SegmentLayout layout, int64_t row_begin, int64_t row_end, int64_t positions,
                               int64_t tile, float* out, int64_t out_stride, bool exact, const InputPrefetch&) {
  rows_times_panel_scalar(src, offsets, values, segments, layout, row_begin, row_end, positions, tile, out, out_stride,
                          exact);
}

#if VPNS_X86
constexpr IsaKernels kIsas[kIsaCount] = {
    {"scalar", rows_times_panel_portable, kLanes},
    {"avx2", rows_times_panel_vector<kLanes, tile_avx2_any<true>, tile_avx2_any<false>>, kLanes},
    {"avx512", rows_times_panel_vector<kWideLanes, tile_avx512_any<true>, tile_avx512_any<false>>, kWideLanes},
};
#else  // widest_isa() is scalar: the vector entries are never chosen
constexpr IsaKernels kIsas[kIsaCount] = {{"scalar", rows_times_panel_portable, kLanes},
                                         {"avx2", rows_times_panel_portable, kLanes},
                                         {"avx512", rows_times_panel_portable, kLanes}};
#endif

// -1 if `name` is not an ISA's name.
int isa_index(const std::string& name) {
  for (int i = 0; i < kIsaCount; ++i) {
    if (name == kIsas[i].name) return i;
  }
  return -1;
}

const IsaKernels& isa_kernels() { return kIsas[static_cast<int>(sparse_isa())]; }

// The ISAs' names, widest first, joined by ", ".
std::string isa_name_list() {
  std::string names;
  for (int i = kIsaCount - 1; i >= 0; --i) names += std::string(kIsas[i].name) + (i > 0 ? ", " : "");
  return names;
}

// out = rows [row_begin, row_end) of the sparse matrix times the panel (whole vectors a tile: out's rows are
// written up to positions rounded up to whole vectors); row r's nonzeros for input block j are
// segments[layout.at(r, j)] .. [layout.at(r, j) + 1].
void rows_times_panel(const float* src, const int32_t* offsets, const float* values, const int64_t* segments,
                      SegmentLayout layout, int64_t row_begin, int64_t row_end, int64_t positions, int64_t tile,
                      float* out, int64_t out_stride, bool exact, const InputPrefetch& prefetch = InputPrefetch()) {
  isa_kernels().rows_times_panel(src, offsets, values, segments, layout, row_begin, row_end, positions, tile, out,
                                 out_stride, exact, prefetch);
}

// ---- convolution geometry -----------------------------------------------------------------------
// The zero-padded input is split into stride_h x stride_w phase planes, plane (a, b) holding
// padded[i * sh + a][j * sw + b]. Output (oh, ow) with tap (kh, kw) then reads plane
// ((kh*dh) % sh, (kw*dw) % sw) at (oh + (kh*dh) / sh, ow + (kw*dw) / sw): for every tap, a
// contiguous row, at any stride and dilation. Outputs are computed on rows of plane_width
// (positions q = oh * plane_width + ow); the columns ow >= OW are garbage and dropped when the
// result is copied out, so one tap is one offset over the whole flattened plane.
struct ConvGeometry {
  int64_t batch, in_channels, height, width, out_channels, kernel_h, kernel_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w;
  int64_t out_h, out_w, plane_h, plane_w, plane_size, planes, channel_stride, image_stride;
  int64_t input_channel_stride;  // floats from one input channel to the next (H * W when contiguous)
  // In place up to 4x4 strides and 7x7 kernels: a call makes its geometry, and heap blocks for these two were part of
  // the serial work before each step's threads start (see sparse_conv2d_with).
  c10::SmallVector<int64_t, 16> plane_slot;  // [stride_h * stride_w] -> index among stored planes, -1 if no tap uses it
  c10::SmallVector<int64_t, 49> tap_offset;  // [kernel_h * kernel_w] -> offset within a channel's planes
  int64_t channel_block;                     // input channels whose tile windows fit in L1 together

  int64_t positions() const { return out_h * plane_w; }
};

std::array<int64_t, 2> pair_arg(const char* op, const char* name, const std::vector<int64_t>& value) {
  TORCH_CHECK(value.size() == 1 || value.size() == 2, op, ": ", name, " must have 1 or 2 elements, got ", value.size());
  return {value[0], value.back()};
}

// A 1x1, stride-1, unpadded convolution reads the input in place of its one phase plane (its channels
// input_channel_stride apart), with exact reads (a masked last vector) where that leaves no whole last vector.
bool reads_input_directly(const ConvGeometry& g) {
  return g.kernel_h == 1 && g.kernel_w == 1 && g.stride_h == 1 && g.stride_w == 1 && g.pad_h == 0 && g.pad_w == 0;
}

// What a convolution's tiles read: its planes, or its input in place in whole vectors or exactly.
enum class Source { kPlanes, kInputWhole, kInputExact };

// The floats of t's storage from t's first element on: how far a kernel may read or write from there.
int64_t floats_from_first(const at::Tensor& t) {
  return static_cast<int64_t>(t.storage().nbytes() / sizeof(float)) - t.storage_offset();
}

// Whether an output may be written into `planes`, a nonempty planar activation [N, C, H, W] whose images are
// `image_floats` apart: its storage holds all N * image_floats floats from its first (the last channel's padding
// included, which an aligned output zeroes), and none of them lies within the span of `input` (its first element to
// its last, whatever storage either belongs to: two storages may share memory).
bool writable_planes(const at::Tensor& planes, const at::Tensor& input, int64_t image_floats) {
  const int64_t floats = planes.size(0) * image_floats;
  if (floats_from_first(planes) < floats) return false;
  int64_t input_last = 0;
  for (int64_t d = 0; d < input.dim(); ++d) input_last += (input.size(d) - 1) * input.stride(d);
  const float* first = planes.const_data_ptr<float>();
  const float* input_first = input.const_data_ptr<float>();
  return first + floats <= input_first || input_first + input_last < first;
}

// S when t is an [N, C, H, W] activation whose channels are S >= H * W floats apart, images C * S apart
// (strides (C * S, S, W, 1): a contiguous tensor, S = H * W, or an aligned output), else -1.
int64_t planar_channel_stride(const at::Tensor& t) {
  if (t.dim() != 4) return -1;
  const int64_t s = t.stride(1);
  const bool planar =
      s >= t.size(2) * t.size(3) && t.stride(0) == t.size(1) * s && t.stride(2) == t.size(3) && t.stride(3) == 1;
  return planar ? s : -1;
}

// Floats from one output channel to the next in an aligned output (sparse_conv2d's aligned_output): whole 64-byte
// cache lines (16 floats), so that every channel starts where a vector load of the next 1x1 conv, reading it in place,
// is aligned, for the AVX2 kernel and the AVX-512 one alike. Planes of 8 floats or less are left as they are (a
// 1x1-pixel output would grow 16x).
//
// Why: a 1x1 conv reads its input in place, a channel's positions at c * H * W; at 14x14 (196 floats) every other
// channel starts 16 bytes off a 32-byte boundary, at 7x7 seven channels of eight are off, and each load that
// straddles two cache lines costs two. bench/results/cpu-aligned-outputs-ab-2026-12-05-amd-b.txt (2-core AMD EPYC,
// 2 threads, AVX2, 10% kept, bias + ReLU fused, per-call ratios contiguous / aligned input, residual and output; the
// contiguous input read in whole last vectors but for its last image): batch 32 256 -> 1024 @14 with residual 1.04x,
// 1024 -> 256 @14 1.08x, 512 -> 2048 @7 with residual 1.35x, 2048 -> 512 @7 1.12x; batch 1 1.03-1.09x. ResNet-50 end
// to end 1.038x at batch 32 (p20-p80 0.990-1.062x), batch 1 within the noise: those layers are a small part of it.
// The engine asks for it only where a 1x1 conv reads the output in place (ResNet-18 has none).
// Whole lines rather than whole 8-float vectors: with 64-byte loads, channels 200 floats apart (14x14) start every
// other one mid-line, so each of its loads straddles two lines. 2-vCPU AMD EPYC of family 0x1A (Zen 5), 2 threads,
// 10% kept, ResNet-50 both ways in one process (rotating rounds, a network each): AVX-512 kernel 1.056x at batch 32
// (p20-p80 1.038-1.081x, 12 rounds; 1.066x in a first run), 1.028x at batch 1 (1.012-1.065x, 40 rounds); the AVX2
// kernel 1.011x and 0.993x, within the A/B's own noise (the same network both ways: 0.993-1.006x;
// bench/results/cpu-aligned-lines-ab-2026-12-05-amd-zen5-scratch.txt). It costs 4% more
// memory for these activations at 14x14 (208 floats), 14% at 7x7 (64).
// Python reads it through vpns::aligned_channel_stride (vpns_fast.deploy.sparse_cpu.aligned_channel_stride).
// The copied input plane of a strided 1x1 conv (make_geometry) is padded by the same rule; its per-layer figures
// there were measured with 8-float vectors, the whole-line rounding only within the networks above.
constexpr int64_t kLineFloats = 16;
constexpr int64_t kUnpaddedMaxFloats = 8;  // planes of this many floats or fewer are not padded
int64_t aligned_plane_stride(int64_t plane) {
  return plane > kUnpaddedMaxFloats ? round_up(plane, kLineFloats) : plane;
}

// The floats from one input channel's copied planes to the next: the planes' size, one 64-byte line more when that
// size is a multiple of 256 bytes. Why: L1d (32 KiB, 8 ways on the CPUs measured) has 64 sets, and addresses 4 KiB
// apart share one. A 3x3 conv at 14x14 copies 16x16 planes, 1 KiB a channel, so channels c, c + 4, c + 8, ... start on
// the same set, and a tile's window (8 of each channel's 16 lines) fell on half of the sets: a channel block sized for
// 24 KiB of L1 had 16 KiB to live in. With 17 lines a channel the starts cover all 64 sets. Scratch A/B in one process
// (each side its own copy of the layer and its offsets, alternating calls, medians of per-call ratios over 15 rounds;
// 2-core AMD EPYC, AVX2, 2 threads, 10% kept, ReLU fused, 2026-12-05;
// bench/results/cpu-cache-set-spread-ab-2026-12-05-amd-scratch.txt): 256 -> 256 3x3 at 14x14 1.11x at batch 32, 1.09x
// at batch 1; 128 -> 128 at 14x14 1.10x; 64 -> 64 at 30x30 (32x32 planes, 4 KiB) 1.21x / 1.18x; where the window is
// the whole channel (3x3/2 at 14x14: four 8x8 phase planes) 1.00x. Whole networks, in which only the 3x3 convs at
// 14x14 change (about a tenth of the time), within the noise: ResNet-50 at batch 32 1.003x and 1.014x in two runs
// (p20-p80 of the second 0.989-1.049x), at batch 1 1.006x; ResNet-18 0.998x-1.002x.
int64_t spread_over_cache_sets(int64_t planes_stride) {
  return planes_stride % 64 == 0 ? planes_stride + 16 : planes_stride;
}

// input_channel_stride: floats from one input channel to the next (0: height * width, a contiguous input); a 1x1,
// stride-1, unpadded conv reads its input in place (reads_input_directly), so its offsets depend on it.
ConvGeometry make_geometry(const char* op, const std::vector<int64_t>& weight_shape, int64_t batch, int64_t height,
                           int64_t width, const std::vector<int64_t>& stride_arg,
                           const std::vector<int64_t>& padding_arg, const std::vector<int64_t>& dilation_arg,
                           int64_t input_channel_stride) {
  TORCH_CHECK(weight_shape.size() == 4, op, ": weight_shape must be [C_out, C_in, KH, KW], got ", weight_shape.size(),
              " elements");
  const std::array<int64_t, 2> stride = pair_arg(op, "stride", stride_arg);
  const std::array<int64_t, 2> padding = pair_arg(op, "padding", padding_arg);
  const std::array<int64_t, 2> dilation = pair_arg(op, "dilation", dilation_arg);
  ConvGeometry g;
  g.batch = batch;
  g.out_channels = weight_shape[0];
  g.in_channels = weight_shape[1];
  g.kernel_h = weight_shape[2];
  g.kernel_w = weight_shape[3];
  g.height = height;
  g.width = width;
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dilation_h = dilation[0];
  g.dilation_w = dilation[1];
  TORCH_CHECK(g.out_channels >= 0 && g.in_channels >= 1 && g.kernel_h >= 1 && g.kernel_w >= 1, op,
              ": bad weight_shape [", g.out_channels, ", ", g.in_channels, ", ", g.kernel_h, ", ", g.kernel_w, "]");
  TORCH_CHECK(g.stride_h >= 1 && g.stride_w >= 1, op, ": stride must be >= 1, got (", g.stride_h, ", ", g.stride_w,
              ")");
  TORCH_CHECK(g.dilation_h >= 1 && g.dilation_w >= 1, op, ": dilation must be >= 1, got (", g.dilation_h, ", ",
              g.dilation_w, ")");
  TORCH_CHECK(g.pad_h >= 0 && g.pad_w >= 0, op, ": padding must be >= 0, got (", g.pad_h, ", ", g.pad_w, ")");
  const int64_t span_h = g.dilation_h * (g.kernel_h - 1), span_w = g.dilation_w * (g.kernel_w - 1);
  TORCH_CHECK(height + 2 * g.pad_h > span_h && width + 2 * g.pad_w > span_w, op, ": input ", height, "x", width,
              " padded by (", g.pad_h, ", ", g.pad_w, ") is smaller than the dilated kernel ", span_h + 1, "x",
              span_w + 1);
  g.out_h = (height + 2 * g.pad_h - span_h - 1) / g.stride_h + 1;
  g.out_w = (width + 2 * g.pad_w - span_w - 1) / g.stride_w + 1;
  g.plane_h = g.out_h + span_h / g.stride_h;
  g.plane_w = g.out_w + span_w / g.stride_w;
  g.plane_size = g.plane_h * g.plane_w;
  g.plane_slot.assign(static_cast<size_t>(g.stride_h * g.stride_w), -1);
  g.planes = 0;
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      const int64_t phase = (kh * g.dilation_h % g.stride_h) * g.stride_w + kw * g.dilation_w % g.stride_w;
      if (g.plane_slot[phase] < 0) g.plane_slot[phase] = g.planes++;
    }
  }
  TORCH_CHECK(input_channel_stride == 0 || input_channel_stride >= height * width, op,
              ": input_channel_stride must be 0 or at least H * W = ", height * width, ", got ", input_channel_stride);
  g.input_channel_stride = input_channel_stride > 0 ? input_channel_stride : height * width;
  // The copy of a 1x1 conv's input (stride 2: one phase plane of four) puts each channel on a 64-byte line, as
  // aligned outputs do for the in-place reads (aligned_plane_stride): every tap of a 1x1 kernel is at the channel's
  // start, so every load is then aligned (with aligned_floats' buffers). 2 threads, 10% kept, ReLU fused, 12
  // alternating calls, a scratch A/B (2026-12-05, 2-core AMD EPYC, AVX2): 512 -> 1024 1x1/2 from 28x28 1.085x at batch
  // 32, 1.06x at batch 1; 1024 -> 2048 1x1/2 from 14x14 1.107x / 1.10x; from 56x56 (planes of 784 floats, aligned
  // already) 1.00x; with the aligned buffers, against the build before both (two builds in alternating processes,
  // bench/results/cpu-aligned-buffers-two-builds-2026-12-05-amd.txt) 0.990-1.125x and 1.119-1.176x at batch 32. Not for
  // larger kernels, whose taps start off the channel's start anyway: a 3x3 at 7x7 (81 -> 88 floats) measured 0.98x.
  const int64_t planes_stride = g.planes * g.plane_size;
  g.channel_stride = reads_input_directly(g)              ? g.input_channel_stride
                     : g.kernel_h == 1 && g.kernel_w == 1 ? aligned_plane_stride(planes_stride)
                                                          : spread_over_cache_sets(planes_stride);
  // Tiles read up to a tile (kWideTile at most) past the last position; the slack keeps that inside the buffer.
  g.image_stride = g.in_channels * g.channel_stride + round_up(g.positions(), kWideTile) + kWideTile;
  TORCH_CHECK(g.image_stride < std::numeric_limits<int32_t>::max(), op, ": one image is too large for 32-bit offsets");
  g.tap_offset.resize(static_cast<size_t>(g.kernel_h * g.kernel_w));
  for (int64_t kh = 0; kh < g.kernel_h; ++kh) {
    for (int64_t kw = 0; kw < g.kernel_w; ++kw) {
      const int64_t phase = (kh * g.dilation_h % g.stride_h) * g.stride_w + kw * g.dilation_w % g.stride_w;
      g.tap_offset[kh * g.kernel_w + kw] = g.plane_slot[phase] * g.plane_size +
                                           (kh * g.dilation_h / g.stride_h) * g.plane_w +
                                           kw * g.dilation_w / g.stride_w;
    }
  }
  // What one tile of one input channel touches: per stored plane, a tile of positions (kTile, or the whole
  // plane when it is smaller: ResNet's 7x7 outputs, 49-63 positions; the even tiles of sparse_conv2d may be
  // narrower, see even_tile, and the AVX-512 kernel's wide tiles up to 2.33 times as wide, their windows then up
  // to that much more: blocks sized for those windows measured 0.99-1.00x on Zen 4, 32 KiB L1d, bench/results/
  // cpu-wide-window-blocks-ab-2026-12-06-amd-zen4-scratch.txt) plus the reach of the taps (whole rows of plane_w
  // below, a few columns right). Counting kTile for those made blocks up to 1.7x too
  // small: 2 threads, batch 1, 10% kept, 9 interleaved rounds, 2048x1024 1x1/2 @14 0.87x, 512x512 3x3/2 @14 0.94x.
  const int64_t tile = std::min(kTile, round_up(g.positions(), kLanes));
  const int64_t window = g.planes * (tile + (g.plane_h - g.out_h) * g.plane_w + (g.plane_w - g.out_w)) * 4;
  g.channel_block = std::max<int64_t>(1, kL1Budget / window);
  return g;
}

// The activations (kRelu, ..., activate<kActivation>) live in activation.h, shared with csrc/winograd.cpp.
using namespace vpns::epilogue;

#if VPNS_X86
// exp_float on 8 lanes, the same steps. The compiler does not vectorize a loop of exp_float well: by
// default its comparisons keep it scalar, and with -fno-trapping-math it computes each short span's peeled ends
// one value at a time. A 96 -> 96 1x1 conv at 112x112 (10% kept, batch 1, 2 threads, medians of 50,
// 2026-12-04) took 0.33 ms without an activation and 0.66 ms followed by torch's SiLU; with the SiLU in its
// epilogue 2.92 ms scalar, 0.98 ms compiler-vectorized, 0.54 ms with this exp applied in place after the plain
// epilogue. In the epilogue's own loop (vector_epilogue_avx2 / _avx512): 0.58 ms with the AVX2 kernel (0.40 ms
// without an activation, 0.70 ms followed by torch's SiLU in the same run), 0.39 ms with the AVX-512 one
// (0.34 ms, 0.68 ms).
// max/min take the constant first: they return their second operand when either is NaN, so NaN passes.
__attribute__((target("avx2,fma"))) inline __m256 power_of_two_avx2(__m256 n) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_sub_epi32(_mm256_castps_si256(_mm256_add_ps(n, _mm256_set1_ps(8388735.0f))),
                                         _mm256_set1_epi32(0x4B000000)),
                        23));
}

__attribute__((target("avx2,fma"))) inline __m256 exp_avx2(__m256 x) {
  const __m256 clamped = _mm256_min_ps(_mm256_set1_ps(88.7228391f), _mm256_max_ps(_mm256_set1_ps(-103.972084f), x));
  const __m256 shift = _mm256_set1_ps(12582912.0f);
  const __m256 n = _mm256_sub_ps(_mm256_fmadd_ps(clamped, _mm256_set1_ps(1.44269504088896341f), shift), shift);
  const __m256 r =
      _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), clamped));
  __m256 p = _mm256_set1_ps(1.98412698e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.38888889e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.33333333e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.16666667e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.66666667e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
  const __m256 half = _mm256_sub_ps(_mm256_fmadd_ps(n, _mm256_set1_ps(0.5f), shift), shift);
  const __m256 result =
      _mm256_mul_ps(_mm256_mul_ps(p, power_of_two_avx2(half)), power_of_two_avx2(_mm256_sub_ps(n, half)));
  const __m256 over = _mm256_cmp_ps(x, _mm256_set1_ps(88.7228391f), _CMP_GT_OQ);
  const __m256 under = _mm256_cmp_ps(x, _mm256_set1_ps(-103.972084f), _CMP_LT_OQ);
  return _mm256_blendv_ps(_mm256_blendv_ps(result, _mm256_set1_ps(std::numeric_limits<float>::infinity()), over),
                          _mm256_setzero_ps(), under);
}

// v / (1 + exp(-v)), as torch computes it. (A reciprocal refined by a Newton step in place of the division
// measured no faster: 4.4 against 4.1 ns a 16-lane vector with AVX-512, one thread, 2026-12-04.)
// (kSigmoid: 1 / (1 + exp(-v)).)
template <int64_t kActivation>
__attribute__((target("avx2,fma"))) inline __m256 logistic_avx2(__m256 v) {
  const __m256 e = exp_avx2(_mm256_sub_ps(_mm256_setzero_ps(), v));
  return _mm256_div_ps(kActivation == kSilu ? v : _mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

// activation(v) on 8 lanes, the same operations as activate<kActivation> (max/min take the constant first: they
// return their second operand when either is NaN or both are zeros, as activate's comparisons do), so the vector
// and scalar epilogues agree bit for bit.
template <int64_t kActivation>
__attribute__((target("avx2,fma"))) inline __m256 activate_avx2(__m256 v) {
  const __m256 zero = _mm256_setzero_ps(), six = _mm256_set1_ps(6.0f);
  if (kActivation == kRelu) return _mm256_max_ps(zero, v);
  if (kActivation == kRelu6) return _mm256_min_ps(six, _mm256_max_ps(zero, v));
  if (kActivation == kHardsigmoid) {
    return _mm256_div_ps(_mm256_min_ps(six, _mm256_max_ps(zero, _mm256_add_ps(v, _mm256_set1_ps(3.0f)))), six);
  }
  if (kActivation == kHardswish) {
    const __m256 clamped = _mm256_min_ps(six, _mm256_max_ps(zero, _mm256_add_ps(v, _mm256_set1_ps(3.0f))));
    return _mm256_div_ps(_mm256_mul_ps(v, clamped), six);
  }
  if (is_logistic(kActivation)) return logistic_avx2<kActivation>(v);
  return v;
}

// dst[i] = activation(sums[i] + add (+ residual[i])) for i in [lo, hi), the sums in registers from load to store:
// every span of the epilogue (epilogue_tile_impl), first written for the SiLU and the sigmoid (the compiler does not
// vectorize exp_float well, see exp_avx2) and for streamed outputs. Applied in place after the plain epilogue's stores
// instead (reading them back), the SiLU made the 96-channel layer above take 0.54 ms and EfficientNet-B0 run 1.02-1.03x
// faster than with torch's SiLU; in registers 0.39 ms and 1.14x.
// kStream: the whole 64-byte lines of dst in the span are written with non-temporal stores (see
// kStreamOutputBytes), so they go to memory without being read first.
// The values before the first line boundary and after the last one go through plain and masked stores: nothing
// outside the span is touched. The AVX-512 loop below is the same on 16 lanes (per-ISA code, as the tile kernels are),
// but starts every span, streamed or not, at dst's next 64-byte line (see epilogue_tile_impl); this one does only when
// streaming.
template <int64_t kActivation>
__attribute__((target("avx2,fma"))) inline void masked_epilogue_avx2(float* dst, const float* sums,
                                                                     const float* residual, int64_t i, int64_t count,
                                                                     __m256 bias) {
  const __m256i mask =
      _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(count)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256 value = _mm256_add_ps(_mm256_maskload_ps(sums + i, mask), bias);
  if (residual) value = _mm256_add_ps(value, _mm256_maskload_ps(residual + i, mask));
  _mm256_maskstore_ps(dst + i, mask, activate_avx2<kActivation>(value));
}

template <int64_t kActivation, bool kStream>
__attribute__((target("avx2,fma"))) void vector_epilogue_avx2(float* dst, const float* sums, const float* residual,
                                                              int64_t lo, int64_t hi, float add) {
  const __m256 bias = _mm256_set1_ps(add);
  int64_t i = lo;
  if (kStream) {
    const int64_t head = std::min<int64_t>(hi - lo, (64 - reinterpret_cast<uintptr_t>(dst + lo) % 64) % 64 / 4);
    for (; i + 8 <= lo + head; i += 8) masked_epilogue_avx2<kActivation>(dst, sums, residual, i, 8, bias);
    if (i < lo + head) masked_epilogue_avx2<kActivation>(dst, sums, residual, i, lo + head - i, bias);
    i = lo + head;
  }
  // Streamed: two vectors a step, one whole line. A line streamed in half and stored in half went out as a
  // partial write and was then read back for the other half's store: the 256 -> 1024 1x1 conv at 14x14 (rows
  // of 784 bytes, so tiles start at every offset in a line) took 10.7 ms streamed that way against 6.3 ms not
  // streamed (batch 32, 2 threads, AVX2 kernel on the Intel Xeon, 2026-12-04).
  for (; kStream && i + 16 <= hi; i += 16) {
    __m256 low = _mm256_add_ps(_mm256_loadu_ps(sums + i), bias),
           high = _mm256_add_ps(_mm256_loadu_ps(sums + i + 8), bias);
    if (residual) {
      low = _mm256_add_ps(low, _mm256_loadu_ps(residual + i));
      high = _mm256_add_ps(high, _mm256_loadu_ps(residual + i + 8));
    }
    _mm256_stream_ps(dst + i, activate_avx2<kActivation>(low));
    _mm256_stream_ps(dst + i + 8, activate_avx2<kActivation>(high));
  }
  for (; i + 8 <= hi; i += 8) {  // not streamed: all whole vectors; streamed: at most one, the last line's half
    __m256 value = _mm256_add_ps(_mm256_loadu_ps(sums + i), bias);
    if (residual) value = _mm256_add_ps(value, _mm256_loadu_ps(residual + i));
    _mm256_storeu_ps(dst + i, activate_avx2<kActivation>(value));
  }
  if (i < hi) masked_epilogue_avx2<kActivation>(dst, sums, residual, i, hi - i, bias);
}

// GCC 12's AVX-512 max/min intrinsics pass _mm512_undefined_ps() as the unused merge source, which its
// -Wmaybe-uninitialized reports at every use (75 warnings); nothing here is uninitialised.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// exp on 16 lanes, for CPUs whose sparse layers run the AVX-512 kernel: the same reduction and polynomial,
// with AVX-512's rounding and scaling instructions in place of the bit manipulation, the range clamps and the
// blends (scalef gives +inf and 0 where 2^n leaves the float range): fewer instructions, and AVX-512 ones issue
// on two ports only. The in-place SiLU this replaced took 0.35 ns a value with these steps against 0.40 with
// exp_float's (a C++ loop over 4096 floats, one thread, 2026-12-04).
// Inputs are clamped to [-200, 200] first (max/min take the constant first, so NaN passes): +-inf would make
// the reduction inf - inf.
__attribute__((target("avx512f"))) inline __m512 exp_avx512(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(200.0f), _mm512_max_ps(_mm512_set1_ps(-200.0f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 r =
      _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x));
  __m512 p = _mm512_set1_ps(1.98412698e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.38888889e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.33333333e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.16666667e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.66666667e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

template <int64_t kActivation>
__attribute__((target("avx512f"))) inline __m512 logistic_avx512(__m512 v) {
  const __m512 e = exp_avx512(_mm512_sub_ps(_mm512_setzero_ps(), v));
  return _mm512_div_ps(kActivation == kSilu ? v : _mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

// activate_avx2 on 16 lanes.
template <int64_t kActivation>
__attribute__((target("avx512f"))) inline __m512 activate_avx512(__m512 v) {
  const __m512 zero = _mm512_setzero_ps(), six = _mm512_set1_ps(6.0f);
  if (kActivation == kRelu) return _mm512_max_ps(zero, v);
  if (kActivation == kRelu6) return _mm512_min_ps(six, _mm512_max_ps(zero, v));
  if (kActivation == kHardsigmoid) {
    return _mm512_div_ps(_mm512_min_ps(six, _mm512_max_ps(zero, _mm512_add_ps(v, _mm512_set1_ps(3.0f)))), six);
  }
  if (kActivation == kHardswish) {
    const __m512 clamped = _mm512_min_ps(six, _mm512_max_ps(zero, _mm512_add_ps(v, _mm512_set1_ps(3.0f))));
    return _mm512_div_ps(_mm512_mul_ps(v, clamped), six);
  }
  if (is_logistic(kActivation)) return logistic_avx512<kActivation>(v);
  return v;
}

template <int64_t kActivation>
__attribute__((target("avx512f"))) inline void masked_epilogue_avx512(float* dst, const float* sums,
                                                                      const float* residual, int64_t i, int64_t count,
                                                                      __m512 bias) {
  const __mmask16 mask = static_cast<__mmask16>((1u << count) - 1u);
  __m512 value = _mm512_add_ps(_mm512_maskz_loadu_ps(mask, sums + i), bias);
  if (residual) value = _mm512_add_ps(value, _mm512_maskz_loadu_ps(mask, residual + i));
  _mm512_mask_storeu_ps(dst + i, mask, activate_avx512<kActivation>(value));
}

// vector_epilogue_avx2 on 16 lanes: a streamed vector is one whole 64-byte line, and so is every vector of a span after
// its masked head (a 64-byte store at any other address straddles two lines; see epilogue_tile_impl).
template <int64_t kActivation, bool kStream>
__attribute__((target("avx512f"))) void vector_epilogue_avx512(float* dst, const float* sums, const float* residual,
                                                               int64_t lo, int64_t hi, float add) {
  const __m512 bias = _mm512_set1_ps(add);
  int64_t i = lo;
  // up to dst's next 64-byte line first (masked), so that no store after it straddles two lines
  const int64_t head = std::min<int64_t>(hi - lo, (64 - reinterpret_cast<uintptr_t>(dst + lo) % 64) % 64 / 4);
  if (head > 0) masked_epilogue_avx512<kActivation>(dst, sums, residual, i, head, bias);
  i = lo + head;
  for (; i + 16 <= hi; i += 16) {
    __m512 value = _mm512_add_ps(_mm512_loadu_ps(sums + i), bias);
    if (residual) value = _mm512_add_ps(value, _mm512_loadu_ps(residual + i));
    if (kStream) {
      _mm512_stream_ps(dst + i, activate_avx512<kActivation>(value));
    } else {
      _mm512_storeu_ps(dst + i, activate_avx512<kActivation>(value));
    }
  }
  if (i < hi) masked_epilogue_avx512<kActivation>(dst, sums, residual, i, hi - i, bias);
}
#pragma GCC diagnostic pop
#endif

// dst[i] = activation((sums[i] + add) (+ residual[i])) for i in [lo, hi): the convolution's epilogue, in the
// order the unfused network computes it.
// (dst and residual may be the same memory: an output written into its residual.)
template <bool kResidual, int64_t kActivation>
inline void epilogue_span(float* dst, const float* __restrict sums, const float* residual, int64_t lo, int64_t hi,
                          float add) {
  for (int64_t i = lo; i < hi; ++i) {
    float value = sums[i] + add;
    if (kResidual) value += residual[i];
    dst[i] = activate<kActivation>(value);
  }
}

// The epilogue of a span in the vector width of the kernel the sparse layers run (sparse_isa), so that forcing
// one tests its SiLU and its streaming stores too (every CPU with AVX-512 has AVX2 and FMA); `stream` has no
// effect with the portable kernel. EfficientNet-B0 (10% kept, batch 1, 2 threads, every conv sparse, Intel Xeon
// with AVX-512, 2026-12-04) ran 1.14x faster (p20-p80 of the per-round ratio 1.12-1.16x, 30 interleaved rounds)
// with its 49 SiLUs here than through torch's SiLU.
template <int64_t kActivation>
void vector_epilogue(float* dst, const float* sums, const float* residual, int64_t lo, int64_t hi, float add,
                     bool stream) {
#if VPNS_X86
  const Isa isa = sparse_isa();
  if (isa == Isa::kAvx512) {
    return stream ? vector_epilogue_avx512<kActivation, true>(dst, sums, residual, lo, hi, add)
                  : vector_epilogue_avx512<kActivation, false>(dst, sums, residual, lo, hi, add);
  }
  if (isa == Isa::kAvx2) {
    return stream ? vector_epilogue_avx2<kActivation, true>(dst, sums, residual, lo, hi, add)
                  : vector_epilogue_avx2<kActivation, false>(dst, sums, residual, lo, hi, add);
  }
#endif
  if (residual) {
    epilogue_span<true, kActivation>(dst, sums, residual, lo, hi, add);
  } else {
    epilogue_span<false, kActivation>(dst, sums, residual, lo, hi, add);
  }
}

// The output pixels [first, second) that the epilogue of the tile of positions [q0, q0 + count) writes in an
// out_h x out_w plane of `plane` pixels (positions q = oh * plane_w + ow; ow >= out_w is dropped, see
// epilogue_tile_impl): first == second when the tile holds only dropped columns.
inline std::pair<int64_t, int64_t> tile_output_span(int64_t q0, int64_t count, int64_t plane_w, int64_t out_w,
                                                    int64_t plane) {
  const int64_t q_last = q0 + count - 1;
  const int64_t lo = std::min(plane, q0 / plane_w * out_w + std::min(q0 % plane_w, out_w));
  const int64_t hi = std::min(plane, q_last / plane_w * out_w + std::min(q_last % plane_w, out_w - 1) + 1);
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(0 <= lo && lo <= hi && hi <= plane);
  return {lo, hi};
}

// Every span of the epilogue in the vector loop of the kernel's ISA (vector_epilogue; AVX-512: a masked head up to the
// next 64-byte line of dst, whole vectors, a masked tail), not only the streamed and logistic ones: epilogue_span's
// loop is compiled for the baseline SSE2 (the portable kernel keeps it). The AVX2 kernel's plain spans now take its
// loop too, which starts aligned only when streaming; on an earlier AVX2 host that loop had read 1.014x
// (docs/cpu-engine-runs.md), not measured again here. On the 2-vCPU Intel Xeon (AVX-512), two builds in alternating
// processes, 2 threads (bench/results/cpu-vector-epilogue-two-builds-2026-12-08-intel-xeon.txt, variant 3): ResNet-50
// at 5% kept, batch 1, the 64 -> 256 1x1 layer with a residual at 56x56 1.19x (faster in 12 of 12 rounds), 128 -> 512
// at 28x28 1.05x, 256 -> 1024 at 14x14 1.07x, the 3x3 layer at 56x56 (rows of 56) 0.98x; the whole call 1.018x (p20-p80
// 1.005-1.049x); at 10% kept and batch 8 1.005x (0.984-1.027x); ResNet-18 at 10% kept, batch 1, all 3x3 but three,
// 0.994x (0.956-1.004x). Without the aligned head the 3x3 layer at 56x56 read 0.93x at batch 8; with the rows of padded
// planes left in SSE2 (only one-run tiles in the vector loop) the 1x1 layer at 14x14 after a 3x3 read 0.93-0.97x, a
// reason not found. On a Zen 5 host (AVX-512, no aligned head) the change had read 1.009x, within the spread
// (docs/cpu-engine-runs.md, "The plain epilogue in AVX-512, on this host").
template <int64_t kActivation>
inline void epilogue_tile_impl(float* dst, const float* sums, const float* residual, int64_t q0, int64_t count,
                               int64_t plane_w, int64_t out_w, float add, bool stream) {
  if (plane_w == out_w) {  // no garbage columns: the tile is one run
    vector_epilogue<kActivation>(dst, sums, residual, q0, q0 + count, add, stream);
    return;
  }
  // Positions q = oh * plane_w + ow; ow >= out_w is dropped.
  for (int64_t oh = q0 / plane_w; oh * plane_w < q0 + count; ++oh) {
    const int64_t ow_lo = std::max<int64_t>(0, q0 - oh * plane_w);
    const int64_t ow_hi = std::min(out_w, q0 + count - oh * plane_w);
    vector_epilogue<kActivation>(dst + oh * out_w, sums + oh * plane_w, residual ? residual + oh * out_w : nullptr,
                                 ow_lo, ow_hi, add, stream);
  }
}

// One output channel's epilogue over the tile of positions [q0, q0 + count): sums indexed by position q
// (rows of plane_w), dst and residual by output pixel (rows of out_w). One call per channel and tile, cloned
// for AVX2 (the baseline build is SSE2): called per output row it took 18% of ResNet-50's time at batch 1
// (perf, 2 threads, 10% kept; 7-14 pixels a call at 14x14 and 7x7). Only this shell (with epilogue_tile_impl's row
// loop) is cloned; each span calls the ISA's own vector_epilogue. Tried, not kept: `flatten`, which
// inlined the SSE2 span loops into each clone (AVX2 loops). One thread, 10% kept, ReLU, the builds in alternating
// processes (2026-12-05, 2-core AMD EPYC): batch 1 1x1 layers with a residual 1.03-1.13x faster, batch 8 1x1 layers at
// 14x14 and 56x56 0.89-0.93x (4 rounds, medians of 60 calls), 3x3 layers unchanged; ResNet-50 and -18 with 2 threads
// within the noise at batch 1 and 32 (bench/results/cpu-epilogue-flatten-three-builds-2026-12-05-amd.txt).
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx2", "default")))
#endif
void epilogue_tile(float* dst, const float* sums, const float* residual, int64_t q0, int64_t count, int64_t plane_w,
                   int64_t out_w, float add, int64_t activation, bool stream) {
  switch (activation) {
    case kRelu: return epilogue_tile_impl<kRelu>(dst, sums, residual, q0, count, plane_w, out_w, add, stream);
    case kSilu: return epilogue_tile_impl<kSilu>(dst, sums, residual, q0, count, plane_w, out_w, add, stream);
    case kRelu6: return epilogue_tile_impl<kRelu6>(dst, sums, residual, q0, count, plane_w, out_w, add, stream);
    case kHardswish: return epilogue_tile_impl<kHardswish>(dst, sums, residual, q0, count, plane_w, out_w, add, stream);
    case kSigmoid: return epilogue_tile_impl<kSigmoid>(dst, sums, residual, q0, count, plane_w, out_w, add, stream);
    case kHardsigmoid:
      return epilogue_tile_impl<kHardsigmoid>(dst, sums, residual, q0, count, plane_w, out_w, add, stream);
    default: return epilogue_tile_impl<kIdentity>(dst, sums, residual, q0, count, plane_w, out_w, add, stream);
  }
}

// The smallest and largest of offsets[0, count) folded into *lo / *hi: a check on every call (ResNet-50's
// 2048-channel layers hold 105K nonzeros at 10% kept), so vectorised, cloned for AVX2 (the baseline
// SSE2 has no packed 32-bit min/max).
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx2", "default")))
#endif
void offset_range(const int32_t* __restrict offsets, int64_t count, int32_t* lo, int32_t* hi) {
  int32_t low = *lo, high = *hi;
  for (int64_t k = 0; k < count; ++k) {
    low = offsets[k] < low ? offsets[k] : low;
    high = offsets[k] > high ? offsets[k] : high;
  }
  *lo = low;
  *hi = high;
}

// Whether values[0, count) never decrease: a packed weight's row pointers or segments, checked on every call
// (ResNet-50 at 5% kept holds about 30,000 over its 53 convolutions). One test a step with the answer folded in, so
// that the compiler vectorizes it (the AVX2 clone; SSE2 has no packed 64-bit compare), where a TORCH_CHECK per
// element branched on each: check_packed took 0.62% of the samples of a ResNet-50 call at 5% kept and batch 1, with
// this 0.42% (0.19% itself, 0.23% here; perf, bench/results/cpu-resnet50-5pct-b1-where-2026-12-06-amd.txt).
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx2", "default")))
#endif
bool non_decreasing(const int64_t* __restrict values, int64_t count) {
  int64_t descents = 0;
  for (int64_t k = 0; k + 1 < count; ++k) descents |= values[k + 1] < values[k] ? 1 : 0;
  return descents == 0;
}

// dst[j] = src[2 * j] for j in [0, count): a row of a stride-2 layer's phase plane. With the stride a constant the
// compiler vectorizes it with shuffles (AVX-512, AVX2 or SSE2 clone); with the stride a variable it was one scalar
// load and store a float. Alone, batch 1, 5% kept, 2 threads, per-round ratios of 15 alternating rounds (2-vCPU Zen 5,
// 2026-12-06, bench/results/cpu-stride2-gather-ab-2026-12-06-amd-scratch.txt): the stem 1.075x, 3x3/2 at 56x56 and
// 28x28 1.147x / 1.105x, 1x1/2 at 56x56 and 28x28 1.185x / 1.122x (layers running the same code both ways read
// 0.974-0.987x in that harness); ResNet-50 / -18 at 5% kept, batch 1, 1.02-1.03x, within the spread. Rows shorter
// than 8 (inputs of 14x14 and less) keep the scalar loop below: a guess, no gain or loss measured there. The vector
// loop stops short of src[2 * (count - 1)], which the scalar tail reads (GCC's peeling for gaps), so no load passes
// the last float the scalar loop reads (tests/deploy/test_sparse_cpu.py checks it against a guard page).
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void copy_every_other(float* __restrict dst, const float* __restrict src, int64_t count) {
  for (int64_t j = 0; j < count; ++j) dst[j] = src[2 * j];
}

// Tried, not kept (2026-12-07, 2-vCPU Intel Xeon, two builds in alternating processes, ResNet-50 at 5% kept, batch 1,
// bench/results/cpu-tried-not-kept-2026-12-07-intel-xeon.txt): each row built as AVX-512 vectors (an expanding
// masked load, or two masked loads and a permute at stride 2, one store masked at the row's end) instead of the libc
// calls below: 0.963x (p20-p80 0.953-1.019x; the stem 0.33-0.37 -> 0.36-0.46 ms).
// Writes rows [row_lo, row_hi) of each of channel c's phase planes of an image (zero padding included) into `dst`
// (that image's g.image_stride floats).
void fill_phase_planes(const ConvGeometry& g, const float* input, int64_t c, float* dst, int64_t row_lo,
                       int64_t row_hi) {
  const float* x = input + c * g.input_channel_stride;
  for (int64_t a = 0; a < g.stride_h; ++a) {
    for (int64_t b = 0; b < g.stride_w; ++b) {
      const int64_t slot = g.plane_slot[a * g.stride_w + b];
      if (slot < 0) continue;
      float* plane = dst + c * g.channel_stride + slot * g.plane_size;
      // Plane column j reads input column j * sw + b - pw: valid for j in [j_lo, j_hi).
      const int64_t j_lo = std::min(g.plane_w, std::max<int64_t>(0, (g.pad_w - b + g.stride_w - 1) / g.stride_w));
      const int64_t j_hi = std::max(j_lo, std::min(g.plane_w, (g.width + g.pad_w - b + g.stride_w - 1) / g.stride_w));
      for (int64_t i = row_lo; i < row_hi; ++i) {
        float* row = plane + i * g.plane_w;
        const int64_t r = i * g.stride_h + a - g.pad_h;
        if (r < 0 || r >= g.height || j_lo >= j_hi) {
          std::memset(row, 0, static_cast<size_t>(g.plane_w) * sizeof(float));
          continue;
        }
        std::memset(row, 0, static_cast<size_t>(j_lo) * sizeof(float));
        const float* in_row = x + r * g.width + (j_lo * g.stride_w + b - g.pad_w);
        if (g.stride_w == 1) {
          std::memcpy(row + j_lo, in_row, static_cast<size_t>(j_hi - j_lo) * sizeof(float));
        } else if (g.stride_w == 2 && j_hi - j_lo >= 8) {
          copy_every_other(row + j_lo, in_row, j_hi - j_lo);
        } else {
          for (int64_t j = j_lo; j < j_hi; ++j) row[j] = in_row[(j - j_lo) * g.stride_w];
        }
        std::memset(row + j_hi, 0, static_cast<size_t>(g.plane_w - j_hi) * sizeof(float));
      }
    }
  }
}

void check_float_cpu(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
}

// What CheckedSegments checks once, and check_packed at every call of segments not known to be in order.
void check_segment_order(const char* op, const int64_t* rp, int64_t entries) {
  TORCH_CHECK(rp[0] == 0, op, ": row_ptr/segments must start at 0, got ", rp[0]);
  TORCH_CHECK(non_decreasing(rp, entries), op, ": row_ptr/segments must be non-decreasing");
}

// `ordered`: row_ptr is known to start at 0 and never decrease (a CheckedSegments), so only its end is read.
void check_packed(const char* op, const at::Tensor& row_ptr, const at::Tensor& index, const char* index_name,
                  const at::Tensor& values, int64_t rows, at::ScalarType value_type = at::kFloat,
                  bool ordered = false) {
  TORCH_CHECK(
      row_ptr.device().is_cpu() && row_ptr.scalar_type() == at::kLong && row_ptr.dim() == 1 && row_ptr.is_contiguous(),
      op, ": row_ptr must be a contiguous 1-d int64 CPU tensor (from the pack function)");
  TORCH_CHECK(index.device().is_cpu() && index.scalar_type() == at::kInt && index.dim() == 1 && index.is_contiguous(),
              op, ": ", index_name, " must be a contiguous 1-d int32 CPU tensor");
  TORCH_CHECK(
      values.device().is_cpu() && values.scalar_type() == value_type && values.dim() == 1 && values.is_contiguous(), op,
      ": values/tap_index must be a contiguous 1-d ", value_type, " CPU tensor (from the pack function)");
  TORCH_CHECK(row_ptr.numel() >= 1 && (row_ptr.numel() - 1) % std::max<int64_t>(rows, 1) == 0 &&
                  (rows > 0 || row_ptr.numel() == 1),
              op, ": row_ptr/segments has ", row_ptr.numel(), " entries, expected a multiple of ", rows, " plus 1");
  TORCH_CHECK(index.numel() == values.numel(), op, ": ", index_name, " has ", index.numel(), " entries but values has ",
              values.numel());
  const int64_t* rp = row_ptr.const_data_ptr<int64_t>();
  const int64_t last = row_ptr.numel() - 1;
  if (!ordered) check_segment_order(op, rp, last + 1);
  TORCH_CHECK(rp[last] == values.numel(), op, ": row_ptr/segments must end at nnz = ", values.numel(), ", got ",
              rp[last]);
}

std::optional<at::Tensor> checked_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t rows) {
  if (!bias || !bias->defined()) return std::nullopt;
  check_float_cpu(op, "bias", *bias);
  TORCH_CHECK(bias->dim() == 1 && bias->numel() == rows, op, ": bias must have shape [", rows, "], got ",
              bias->sizes());
  return bias->contiguous();
}

// Positions a convolution's tile computes: as many tiles as kTile-wide ones would need, each ceil(vectors / tiles)
// whole vectors of `lanes` floats, the last taking what is left. Why: a tile of v vectors runs v chains of FMAs, one
// per accumulator, each waiting on its last, so a short tile costs far more than its share of positions. Cut in
// kTile-wide tiles, ResNet's 14x14 planes (196 positions; a 3x3 conv's 224) left a last tile of 4 (32)
// positions; now 9, 9 and 7 vectors (10, 10 and 8). Where 12 tiles or more are needed the width is kTile again and the
// last tile may still be short (47x47: 2209 positions, 24 tiles of 12 vectors, the last of one position): one tile of
// many. AVX2 kernel, 1 thread, 10% kept, inputs laid out as aligned outputs, best of 9 runs of 0.1 s, the two builds
// one after the other (bench/results/cpu-even-tiles-two-builds-2026-12-05-amd.txt, a scratch run on the 2-core AMD
// EPYC): 256 -> 256 1x1 at 14x14 0.077 -> 0.071 ms (at 12x16, 192 positions in two whole tiles: 0.065 ms), 1024 -> 256
// and 256 -> 1024 0.231 -> 0.212 and 0.275 -> 0.254 ms, 256 -> 1024 at batch 32 12.32 -> 11.94 ms; a 3x3 at 14x14
// 0.540 -> 0.538 ms: its unaligned loads bound it, not the chains. The AVX-512 kernel's tiles (16 lanes) were not
// measured.
//
// The AVX-512 kernel takes tiles of up to 12 zmm vectors (kWideTile, 192 positions) on every plane (ResNet's 14x14
// layers: 196 positions of a 1x1 conv in 2 tiles of 7 vectors rather than 3 of 5, 5 and 3; a 3x3 conv's 224
// likewise; 56x56: 17 tiles of 12 rather than 33 of 6), so a nonzero's broadcast and offset serve more vectors and
// more FMA chains hide the FMA's latency. The channel blocks stay those of kTile-wide windows (make_geometry).
// 2-vCPU Zen 5, 2 threads, both ways in one process, rounds grouped by the vCPUs' placement
// (bench/results/cpu-wide-tiles-ab-2026-12-06-amd-zen5.txt). Against tiles of 6 (set_wide_tiles), with wide tiles
// then on planes of at most 384 positions only: ResNet-50 at 5% and 10% kept, batch 1, 1.041x (p20-p80 1.027-1.057x
// and 1.028-1.065x) with the vCPUs together, at 5% 1.023x apart; ResNet-18 1.023-1.027x; ResNet-50 at 50%
// 1.007-1.009x; batch 32 1.011-1.015x. Alone, 5% kept: 3x3 at 14x14 1.10x, 256 -> 1024 1x1 1.12x, 3x3 at 17x17
// 1.14x, but the reducing 1x1 layers lose (1024 -> 256 at 14x14 0.94x, at 12x12 0.91x: with fewer tiles split_work
// cut their rows into more blocks, each reading the whole input again; now it does not, see share_out). That limit of
// 384 positions rested on a confounded run: 12-vector tiles everywhere measured 0.88-0.90x when the tile's loops were
// unrolled by 8 and tiles of 9-12 vectors spilled their accumulators. Unrolled by 16, every plane against the limit
// (same file, 2026-12-06): ResNet-50 at 5% kept, batch 1, 1.034x together (p20-p80 1.015-1.052x), 0.995x apart;
// ResNet-18 at 5% 1.051x together, 1.031x apart; ResNet-50 at 10% 1.022x; batch 32 1.012-1.045x; ResNet-50 at 50%
// 0.996-0.997x (within its p20-p80 of 0.983-1.020x). Inside a ResNet-50 call at 5% kept: the stem 1.24x, the 56x56
// layers 1.03-1.17x, the 28x28 stride-1 1x1 layers 1.05-1.09x, but the 28x28 stride-1 3x3 ones 0.97-1.00x (not
// worked out; their windows of 160 positions are wider than the 96 the channel blocks were sized for).
//
// Since 2026-12-06 a wide tile may take up to 14 zmm vectors (224 positions) where that cuts the plane into fewer
// tiles without more vectors in all: the fewest tiles of at most 14 vectors whose vectors, all tiles together, are no
// more than the cut into tiles of at most 12 gives. ResNet's 14x14 planes are then one tile (a 1x1 conv's 196
// positions in 13 vectors rather than 2 of 7, a 3x3 conv's 224 in 14), 56x56 planes 14 tiles of 14 rather than 17 of
// 12 (196 vectors rather than 204); 28x28 planes keep 5 tiles of 10 (4 of 13 would be 52 vectors, not 50). Each
// position's sum takes its nonzeros in the same order, so the outputs are bit for bit the same. 14 accumulators, a
// broadcast and a masked last load fit AVX-512's 32 registers (the object code keeps them there: no zmm spilled).
// 2-vCPU Zen 4 (family 0x19, model 0x11), 2 threads, both ways in one process, rounds grouped by the vCPUs'
// placement, 12 / 14 (bench/results/cpu-wide-tile-vectors-ab-2026-12-06-amd-zen4-scratch.txt, two runs): ResNet-50
// at 5% kept, batch 1, 1.008x with the vCPUs sharing an L3 (p20-p80 0.998-1.030x) and 1.055x apart (1.036-1.083x),
// at 10% 1.004x sharing; ResNet-18 at 5% and 10% 0.999x / 1.002x sharing, 1.031x apart; MobileNetV2 at 10% 0.995x
// and 1.001x sharing, 1.041x apart; batch 32 (ResNet-50 at 5%, ResNet-18 at 10%, MobileNetV2 at 10%) 1.006-1.051x,
// but for one lone round of MobileNetV2 sharing the L3, 0.927x.
// Why apart gains more is not worked out. Other CPUs are not measured.
int64_t even_tile(int64_t positions, int64_t lanes) {
  const bool wide = lanes == kWideLanes && wide_tiles().load(std::memory_order_relaxed);
  const int64_t most = (wide ? 12 * kWideLanes : kTile) / lanes;
  const int64_t vectors = std::max<int64_t>(1, (positions + lanes - 1) / lanes);
  const int64_t tiles = (vectors + most - 1) / most, width = (vectors + tiles - 1) / tiles;
  if (!wide) return width * lanes;
  const int64_t longest = wide_tile_vectors().load(std::memory_order_relaxed);
  for (int64_t fewer = (vectors + longest - 1) / longest; fewer < tiles; ++fewer) {
    const int64_t wider = (vectors + fewer - 1) / fewer;
    if (fewer * wider <= tiles * width) return wider * lanes;
  }
  return width * lanes;
}

// Output channels per work item: enough items to balance the threads, few enough channels that
// their wide output rows stay in L2 beside the input tile.
int64_t rows_per_block(int64_t rows, int64_t batch, int64_t row_floats) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t block = std::max<int64_t>(1, rows * batch / (4 * threads));
  block = std::min<int64_t>(block, 16);
  block = std::min<int64_t>(block, std::max<int64_t>(1, (256 * 1024 / 4) / std::max<int64_t>(1, row_floats)));
  return block;
}

// How a convolution's work is cut into items: blocks of output rows (channels) x images x chunks of
// position tiles. Rows are split last: every row of a block reads the same input tile while it is in
// L1, so the fewer the blocks, the fewer times the input travels from L2/L3.
struct WorkSplit {
  int64_t rows, row_blocks, chunk_tiles, chunks;
};

// `target`: items wanted, for the dynamic scheduling to balance (a few per thread); `tile`: positions a tile. Where
// the tiles are too few for `target` items, the rows are cut into blocks until there are `row_target` items (at most
// `target`); each block reads the whole input again. Then the tiles are cut into at least `min_chunks` runs where
// there are that many tiles (the rows already cut).
WorkSplit split_work(int64_t out_rows, int64_t batch, int64_t positions, int64_t tile, int64_t nnz, int64_t target,
                     int64_t row_target, int64_t min_chunks) {
  const int64_t tiles = std::max<int64_t>(1, (positions + tile - 1) / tile);
  WorkSplit s;
  // A block's nonzeros (8 bytes each) should stay in L2 across the images and tiles that reuse them,
  // and its accumulators (a tile's floats a row, kTile at least) beside them.
  const int64_t per_row = std::max<int64_t>(1, nnz / std::max<int64_t>(1, out_rows));
  s.rows = std::max<int64_t>(
      1, std::min({out_rows, kRowBlockBytes / (8 * per_row), kRowBlockBytes / (4 * std::max(tile, kTile))}));
  s.row_blocks = (out_rows + s.rows - 1) / s.rows;
  s.chunks = std::min(tiles, std::max<int64_t>(1, (target + s.row_blocks * batch - 1) / (s.row_blocks * batch)));
  row_target = std::min(row_target, target);
  if (s.row_blocks * batch * s.chunks < row_target) {
    const int64_t wanted = std::min(out_rows, (row_target + batch * s.chunks - 1) / (batch * s.chunks));
    s.rows = (out_rows + wanted - 1) / wanted;
    s.row_blocks = (out_rows + s.rows - 1) / s.rows;
  }
  s.chunks = std::max(s.chunks, std::min(tiles, min_chunks));
  s.chunk_tiles = (tiles + s.chunks - 1) / s.chunks;
  s.chunks = (tiles + s.chunk_tiles - 1) / s.chunk_tiles;
  return s;
}

// out[n * out_features + o] for a [batch, features] input x with the batch as the vector dimension: x is
// transposed into a panel [features, batch] and output feature o is the sparse combination of its rows given
// by segments (laid out as `layout` says, as for rows_times_panel); columns[k] is nonzero k's feature. Then
// the convolution's epilogue: (sum + bias) + residual (same layout as out), then the ReLU (NaN kept). For
// batch >= kLanes: the linear layer, and 1x1 convolutions of 1x1 inputs (squeeze-excitation blocks; 2048x512
// at 10% kept, batch 32: 0.31 ms against 1.9 ms through the convolution's tiles of one position).
// The epilogue walks the output row by row (n outer, o inner): each output row gets one contiguous run of the
// block's features, and the strided reads come from the block's sums, which are in cache. Feature by feature it
// wrote one float to each of `batch` output rows in turn, cache lines the next feature would write again. 2 threads,
// 10% kept, 2-core AMD EPYC, time against F.linear in the same process, 3 alternating processes each way
// (2026-12-05): 197 x 768 -> 3072 (ViT-B's expanding MLP) 0.79x -> 0.43-0.44x, 3136 x 64 -> 256 1.74-1.77x ->
// 1.28-1.39x; 197 x 3072 -> 768, 197 x 768 -> 2304 and 32 x 2048 -> 1000 unchanged (within 3%).
void batch_as_vectors(const char* op, const at::Tensor& x, const int32_t* columns, const float* vals,
                      const int64_t* segments, SegmentLayout layout, int64_t out_features, const float* bias,
                      const float* residual, int64_t activation, float* out) {
  const int64_t batch = x.size(0), features = x.size(1), nnz = segments[out_features * layout.blocks];
  at::Tensor panel = at::zeros({features * batch + kTile}, x.options());
  panel.narrow(0, 0, features * batch).view({features, batch}).copy_(x.t());
  TORCH_CHECK(features * batch < std::numeric_limits<int32_t>::max(), op, ": input too large for 32-bit offsets");
  std::vector<int32_t> offsets(static_cast<size_t>(nnz));
  for (int64_t k = 0; k < nnz; ++k) offsets[k] = static_cast<int32_t>(columns[k] * batch);
  const float* panel_data = panel.const_data_ptr<float>();
  const int64_t wide_stride = round_up(batch, kTile);
  const int64_t block = rows_per_block(out_features, 1, wide_stride);
  const int64_t blocks = (out_features + block - 1) / block;
  parallel_items(blocks, block * wide_stride, [&](int64_t item, float* wide) {
    const int64_t o0 = item * block, o1 = std::min(out_features, o0 + block);
    rows_times_panel(panel_data, offsets.data(), vals, segments, layout, o0, o1, batch, kTile, wide, wide_stride,
                     false);
    for (int64_t n = 0; n < batch; ++n) {
      float* out_row = out + n * out_features;
      const float* residual_row = residual ? residual + n * out_features : nullptr;
      for (int64_t o = o0; o < o1; ++o) {
        float value = wide[(o - o0) * wide_stride + n] + (bias ? bias[o] : 0.0f);
        if (residual_row) value += residual_row[o];
        out_row[o] = activate(value, activation);
      }
    }
  });
}

}  // namespace

namespace vpns {

std::string sparse_kernel_isa() { return isa_kernels().name; }

int64_t sparse_tile_width(int64_t positions) {
  TORCH_CHECK(positions >= 1, "sparse_tile_width: positions must be at least 1, got ", positions);
  return even_tile(positions, isa_kernels().lanes);
}

bool avx512_kernels_chosen() { return sparse_isa() == Isa::kAvx512; }

int64_t aligned_channel_stride(int64_t plane) {
  TORCH_CHECK(plane >= 0, "aligned_channel_stride: plane must be >= 0 floats, got ", plane);
  return aligned_plane_stride(plane);
}

void zero_aligned_padding(float* out, int64_t planes, int64_t plane, int64_t stride) {
  if (stride <= plane) return;
  at::parallel_for(0, planes, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) std::fill(out + i * stride + plane, out + (i + 1) * stride, 0.0f);
  });
}

std::vector<std::string> sparse_kernel_isas() {
  std::vector<std::string> names;
  for (int i = static_cast<int>(widest_isa()); i >= 0; --i) names.emplace_back(kIsas[i].name);
  return names;
}

std::string sparse_kernel_isa_environment_note() {
  const std::optional<std::string>& wanted = isa_environment();
  if (!wanted || isa_index(*wanted) >= 0) return "";
  std::string shown;  // control characters escaped: the note is one line
  for (const unsigned char c : *wanted) {
    if (c < 0x20 || c == 0x7f) {
      char escaped[8];
      std::snprintf(escaped, sizeof(escaped), "\\x%02x", c);
      shown += escaped;
    } else {
      shown += static_cast<char>(c);
    }
  }
  return "VPNS_FAST_SPARSE_ISA='" + shown + "' is not one of " + isa_name_list() +
         ": ignored, the sparse kernels run with " + kIsas[static_cast<int>(default_isa())].name;
}

std::string set_sparse_kernel_isa(const std::string& name) {
  const int index = isa_index(name);
  TORCH_CHECK(index >= 0, "set_sparse_kernel_isa: name must be one of ", isa_name_list(), ", got '", name, "'");
  TORCH_CHECK(index <= static_cast<int>(widest_isa()), "set_sparse_kernel_isa: this CPU has no ", name,
              " (the widest it runs is ", kIsas[static_cast<int>(widest_isa())].name, ")");
  return kIsas[chosen_isa().exchange(index)].name;
}

bool set_next_tile_prefetch(bool enabled) { return next_tile_prefetch().exchange(enabled); }

bool set_wide_tiles(bool enabled) { return wide_tiles().exchange(enabled); }
int64_t set_wide_tile_vectors(int64_t vectors) {
  TORCH_CHECK(vectors >= 12 && vectors <= kMaxWideVectors, "set_wide_tile_vectors: vectors must be 12 to ",
              kMaxWideVectors, ", got ", vectors);
  return wide_tile_vectors().exchange(static_cast<int>(vectors));
}

bool set_output_prefetch_for_write(bool enabled) { return output_prefetch_for_write().exchange(enabled); }

int64_t private_planes_held_bytes() { return this_thread_planes().floats * static_cast<int64_t>(sizeof(float)); }

int64_t set_private_planes_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "set_private_planes_bytes: bytes must be >= 0, got ", bytes);
  return private_planes_bytes().exchange(bytes);
}

int64_t set_streamed_output_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "set_streamed_output_bytes: bytes must be >= 0, got ", bytes);
  return streamed_output_bytes().exchange(bytes);
}

int64_t set_in_place_residual_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "set_in_place_residual_bytes: bytes must be >= 0, got ", bytes);
  return in_place_residual_bytes().exchange(bytes);
}

int64_t in_place_residual_threshold() { return in_place_residual_bytes().load(std::memory_order_relaxed); }

std::vector<at::Tensor> sparse_conv2d_pack(const at::Tensor& weight) {
  check_float_cpu("sparse_conv2d_pack", "weight", weight);
  TORCH_CHECK(weight.dim() == 4, "sparse_conv2d_pack: weight must be 4-d [C_out, C_in, KH, KW], got ", weight.dim(),
              "-d");
  at::NoGradGuard no_grad;
  const at::Tensor w = weight.contiguous();
  const int64_t out_channels = w.size(0), per_row = w.size(1) * w.size(2) * w.size(3);
  const int64_t taps = w.size(2) * w.size(3);
  TORCH_CHECK(w.size(1) < std::numeric_limits<int32_t>::max() && taps < std::numeric_limits<int32_t>::max(),
              "sparse_conv2d_pack: weight too large");
  const float* data = w.const_data_ptr<float>();
  at::Tensor row_ptr = at::empty({out_channels + 1}, at::kLong);
  int64_t* rp = row_ptr.mutable_data_ptr<int64_t>();
  rp[0] = 0;
  for (int64_t o = 0; o < out_channels; ++o) {
    int64_t count = 0;
    for (int64_t i = 0; i < per_row; ++i) count += data[o * per_row + i] != 0.0f;
    rp[o + 1] = rp[o] + count;
  }
  const int64_t nnz = rp[out_channels];
  at::Tensor channel_index = at::empty({nnz}, at::kInt), tap_index = at::empty({nnz}, at::kInt);
  at::Tensor values = at::empty({nnz}, at::kFloat);
  int32_t* ci = channel_index.mutable_data_ptr<int32_t>();
  int32_t* ti = tap_index.mutable_data_ptr<int32_t>();
  float* v = values.mutable_data_ptr<float>();
  at::parallel_for(0, out_channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      int64_t k = rp[o];
      for (int64_t i = 0; i < per_row; ++i) {
        const float value = data[o * per_row + i];
        if (value == 0.0f) continue;
        ci[k] = static_cast<int32_t>(i / taps);
        ti[k] = static_cast<int32_t>(i % taps);
        v[k] = value;
        ++k;
      }
    }
  });
  return {row_ptr, channel_index, tap_index, values};
}

// Input channels per block that sparse_conv2d_offsets uses by default for a weight of `nnz` nonzeros.
// Each row's nonzeros within a block run as one call of the tile kernel, which loads and stores its 12
// accumulators around them: a block of too few nonzeros a row spends more on that than on the sums (a 1x1
// conv at 5% kept has 3.2 a row in 64 channels). So blocks grow to about kRowBlockNonzeros nonzeros a row,
// to at most 4 L1 windows (read from L2 then). ResNet-50, 2 threads, per-round ratios of 16 interleaved
// rounds: batch 1 at 5% kept 1.05x (p20-p80 1.04-1.06x), at 10% 1.01x (1.00-1.02x); batch 32 at 5% and
// ResNet-18 (few 1x1 convs) 1.00x. 24 nonzeros rather than 12: 1.02x / 1.01x more, within the spread.
// The channels are then shared out over the blocks: the number of blocks rounded to the nearest (at least as many
// as the bound allows: 4 L1 windows, or one where the L1 window decides), each block ceil(C_in / blocks) channels
// (only the last may be smaller, by fewer channels than there are blocks: 1024 channels at 10% kept are 8 x 114 +
// 112). Cut at the block size, the last block held what was left: ResNet-50's 256 -> 1024 1x1 conv at 10% kept
// had blocks of 120, 120 and 16 channels (1.6 nonzeros a row in the last, which still loads and stores every row's
// accumulators), now 2 of 128; 512 -> 512 3x3 at 7x7 seven of 73 and one of 1, now 8 of 64. 2-core AMD EPYC, 2
// threads, 10% kept, both ways in one process (bench/results/cpu-even-channel-blocks-ab-2026-12-05-amd-scratch.txt):
// the expanding 1x1 convs at batch 1 1.10x (256 -> 1024 at 14x14, 512 -> 2048 at 7x7), at batch 32 1.02-1.05x with
// their residual, 256 -> 64 at 56x56 1.07-1.10x, the 3x3 layers 0.997-1.027x; ResNet-50 at batch 32 1.015x (p20-p80
// 1.008-1.023x, 16 rounds), at batch 1 1.021x (0.996-1.042x, 60 rounds), ResNet-18 1.007x / 1.009x, MobileNetV2 at
// batch 32 1.008x (0.977-1.028x).
int64_t default_channel_block(const ConvGeometry& g, int64_t nnz) {
  const double per_channel =
      static_cast<double>(nnz) / static_cast<double>(std::max<int64_t>(1, g.out_channels) * g.in_channels);
  const int64_t wanted = per_channel > 0 ? static_cast<int64_t>(kRowBlockNonzeros / per_channel) : g.channel_block;
  const int64_t size = std::max(g.channel_block, std::min(4 * g.channel_block, wanted));
  const int64_t largest = wanted <= g.channel_block ? g.channel_block : 4 * g.channel_block;
  const int64_t channels = std::max<int64_t>(1, g.in_channels);
  const int64_t nearest = static_cast<int64_t>(static_cast<double>(channels) / static_cast<double>(size) + 0.5);
  const int64_t blocks = std::max({(channels + largest - 1) / largest, nearest, int64_t{1}});
  return (channels + blocks - 1) / blocks;
}

std::vector<at::Tensor> sparse_conv2d_offsets(const at::Tensor& row_ptr, const at::Tensor& channel_index,
                                              const at::Tensor& tap_index, const at::Tensor& values,
                                              std::vector<int64_t> weight_shape, std::vector<int64_t> input_size,
                                              std::vector<int64_t> stride, std::vector<int64_t> padding,
                                              std::vector<int64_t> dilation, int64_t channel_block,
                                              int64_t input_channel_stride) {
  constexpr const char* op = "sparse_conv2d_offsets";
  TORCH_CHECK(input_size.size() == 2, op, ": input_size must be (H, W), got ", input_size.size(), " elements");
  const ConvGeometry g =
      make_geometry(op, weight_shape, 1, input_size[0], input_size[1], stride, padding, dilation, input_channel_stride);
  check_packed(op, row_ptr, channel_index, "channel_index", tap_index, g.out_channels, at::kInt);
  const int64_t nnz = channel_index.numel(), taps = g.kernel_h * g.kernel_w, rows = g.out_channels;
  TORCH_CHECK(values.device().is_cpu() && values.scalar_type() == at::kFloat && values.dim() == 1 &&
                  values.is_contiguous() && values.numel() == nnz,
              op, ": values must be a contiguous 1-d float32 CPU tensor of ", nnz, " entries (from the pack function)");
  const int32_t* ci = channel_index.const_data_ptr<int32_t>();
  const int32_t* ti = tap_index.const_data_ptr<int32_t>();
  bool in_range = true;
  for (int64_t k = 0; k < nnz; ++k) {
    in_range &= ci[k] >= 0 && ci[k] < g.in_channels && ti[k] >= 0 && ti[k] < taps;
  }
  TORCH_CHECK(in_range, op, ": channel_index/tap_index out of range for weight_shape");
  const int64_t block = channel_block > 0 ? channel_block : default_channel_block(g, nnz);
  const int64_t blocks = (g.in_channels + block - 1) / block;
  // Each (row, block) run of the packed (row-major) nonzeros, then the runs laid out block-major (SegmentLayout).
  const int64_t* rp = row_ptr.const_data_ptr<int64_t>();
  std::vector<int64_t> run_start(static_cast<size_t>(rows * blocks + 1));
  for (int64_t o = 0; o < rows; ++o) {
    int64_t k = rp[o];
    for (int64_t j = 0; j < blocks; ++j) {
      run_start[o * blocks + j] = k;
      while (k < rp[o + 1] && ci[k] < (j + 1) * block) {
        TORCH_CHECK(k == rp[o] || ci[k] >= ci[k - 1], op, ": nonzeros must be sorted by input channel");
        ++k;
      }
    }
  }
  run_start[rows * blocks] = nnz;
  at::Tensor offsets = at::empty({nnz}, at::kInt);
  at::Tensor ordered = at::empty({nnz}, at::kFloat);
  at::Tensor segments = at::empty({rows * blocks + 1}, at::kLong);
  int32_t* out = offsets.mutable_data_ptr<int32_t>();
  float* out_values = ordered.mutable_data_ptr<float>();
  int64_t* seg = segments.mutable_data_ptr<int64_t>();
  const float* vals = values.const_data_ptr<float>();
  int64_t p = 0;
  for (int64_t j = 0; j < blocks; ++j) {
    for (int64_t o = 0; o < rows; ++o) {
      seg[j * rows + o] = p;
      const int64_t end = j + 1 < blocks ? run_start[o * blocks + j + 1] : rp[o + 1];
      for (int64_t k = run_start[o * blocks + j]; k < end; ++k, ++p) {
        out[p] = static_cast<int32_t>(ci[k] * g.channel_stride + g.tap_offset[ti[k]]);
        out_values[p] = vals[k];
      }
    }
  }
  seg[rows * blocks] = nnz;
  return {offsets, segments, ordered};
}

namespace {

// sparse_conv2d with the offsets' smallest and largest value known (`range`, from a CheckedOffsets) or not (scanned),
// and the segments known to never decrease (`segments_ordered`, from a CheckedSegments) or not (checked).
at::Tensor sparse_conv2d_with(const at::Tensor& input, const at::Tensor& segments, const at::Tensor& offsets,
                              std::optional<std::pair<int32_t, int32_t>> range, bool segments_ordered,
                              const at::Tensor& values, const std::vector<int64_t>& weight_shape,
                              const std::optional<at::Tensor>& bias, const std::vector<int64_t>& stride,
                              const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
                              const std::optional<at::Tensor>& residual, int64_t activation,
                              int64_t input_channel_stride, bool aligned_output, bool residual_reusable) {
  constexpr const char* op = "sparse_conv2d";
  TORCH_CHECK(activation >= 0 && activation < kActivations, op,
              ": activation must be 0 (none), 1 (relu), 2 (silu), 3 (relu6), 4 (hardswish), 5 (sigmoid) or 6 "
              "(hardsigmoid), got ",
              activation);
  check_float_cpu(op, "input", input);
  TORCH_CHECK(input.dim() == 4, op, ": input must be 4-d [N, C_in, H, W], got ", input.dim(), "-d");
  const ConvGeometry g = make_geometry(op, weight_shape, input.size(0), input.size(2), input.size(3), stride, padding,
                                       dilation, input_channel_stride);
  TORCH_CHECK(input_channel_stride == 0 || planar_channel_stride(input) == input_channel_stride, op,
              ": input_channel_stride ", input_channel_stride, " does not match the input's strides ", input.strides(),
              " (expected (C_in * S, S, W, 1) with S = input_channel_stride)");
  TORCH_CHECK(input.size(1) == g.in_channels, op, ": input has ", input.size(1), " channels, the weight expects ",
              g.in_channels, " (groups > 1 is not supported)");
  check_packed(op, segments, offsets, "offsets", values, g.out_channels, at::kFloat, segments_ordered);
  TORCH_CHECK(g.out_channels == 0 || segments.numel() > g.out_channels, op, ": segments has ", segments.numel(),
              " entries, expected at least one channel block a row: out_channels * blocks + 1 with blocks >= 1 (from "
              "sparse_conv2d_offsets)");
  // as sparse_conv2d_offsets orders the nonzeros
  const SegmentLayout layout =
      block_major(g.out_channels, g.out_channels > 0 ? (segments.numel() - 1) / g.out_channels : 1);
  const std::optional<at::Tensor> b = checked_bias(op, bias, g.out_channels);
  // Offsets are computed for one input geometry; a stale set must not read outside the planes.
  const int64_t nnz = values.numel();
  const int32_t* off = offsets.const_data_ptr<int32_t>();
  int32_t min_offset = 0, max_offset = 0;
  if (range) {
    std::tie(min_offset, max_offset) = *range;
  } else {
    offset_range(off, nnz, &min_offset, &max_offset);
  }
  TORCH_CHECK(min_offset >= 0 && max_offset < g.in_channels * g.channel_stride, op, ": offsets do not fit this input (",
              g.height, "x", g.width,
              "); compute them with sparse_conv2d_offsets for this input size and the same stride/padding/dilation");

  at::NoGradGuard no_grad;
  const at::Tensor x = input_channel_stride > 0 ? input : contiguous_activation(input);
  const int64_t plane = g.out_h * g.out_w;
  // Floats from one output channel to the next: whole 64-byte lines when asked (aligned_plane_stride).
  const int64_t out_stride = aligned_output ? aligned_plane_stride(plane) : plane;
  const std::array<int64_t, 4> out_sizes{g.batch, g.out_channels, g.out_h, g.out_w};
  const std::array<int64_t, 4> out_strides{g.out_channels * out_stride, out_stride, g.out_w, 1};
  at::Tensor res;
  int64_t res_stride = plane;
  if (residual && residual->defined()) {
    check_float_cpu(op, "residual", *residual);
    TORCH_CHECK(residual->sizes() == at::IntArrayRef(out_sizes), op, ": residual must have the output's shape ",
                at::IntArrayRef(out_sizes), ", got ", residual->sizes());
    // an aligned activation (a former output) is read as it is, anything else made contiguous
    const int64_t planar = planar_channel_stride(*residual);
    res = planar > 0 ? *residual : contiguous_activation(*residual);
    res_stride = planar > 0 ? planar : plane;
  }
  const int64_t output_bytes = g.batch * g.out_channels * plane * static_cast<int64_t>(sizeof(float));
  const bool stream = sparse_isa() != Isa::kScalar && g.kernel_h == 1 && g.kernel_w == 1 &&
                      output_bytes >= streamed_output_bytes().load(std::memory_order_relaxed);
  // Into the residual (kInPlaceResidualBytes) where the caller allows it, the residual is laid out as the output would
  // be and its storage holds every channel's padding too (an aligned output's is zeroed there, as in a new one), and
  // none of that memory is the input's; every output value reads its own residual value just before it is written,
  // so nothing is read after it changes.
  const bool in_place = residual_reusable && res.defined() && output_bytes > 0 && !stream &&
                        output_bytes >= in_place_residual_bytes().load(std::memory_order_relaxed) &&
                        res.strides() == at::IntArrayRef(out_strides) && writable_planes(res, x, out_strides[0]);
  at::Tensor output = in_place ? res
                      : out_stride == plane
                          ? empty_activation(out_sizes)
                          : empty_activation({g.batch, g.out_channels, out_stride}).as_strided(out_sizes, out_strides);
  if (output.numel() == 0) return output;
  const bool prefetch_next = next_tile_prefetch().load(std::memory_order_relaxed);
  // Chosen once a call: whether a tile may read whole last vectors depends on the width it reads (another thread
  // may change the choice meanwhile).
  const IsaKernels& kernels = isa_kernels();
  const bool for_write = output_prefetch_for_write().load(std::memory_order_relaxed) && cpu_has_prefetchw();
  const float* x_data = x.const_data_ptr<float>();
  const int64_t used = g.in_channels * g.channel_stride;
  const int64_t positions = g.positions();
  const int64_t tile = even_tile(positions, kernels.lanes);
  // The stride of the sums' rows in each thread's scratch: the widest tile this call's kernel may run (from the
  // kernel chosen once above, so that a concurrent set_wide_tiles cannot make a tile wider than its rows).
  const int64_t sums_stride = kernels.lanes == kWideLanes ? kWideTile : kTile;
  const int64_t* seg = segments.const_data_ptr<int64_t>();
  const float* vals = values.const_data_ptr<float>();
  const float* bias_data = b ? b->const_data_ptr<float>() : nullptr;
  const float* res_data = res.defined() ? res.const_data_ptr<float>() : nullptr;
  float* out_data = output.mutable_data_ptr<float>();

  // What a tile read in place prefetches: the next block's window of input channels, blocks of
  // ceil(C_in / blocks) channels. That is the default blocks' size (default_channel_block shares the channels out
  // so; its block count gives it back); offsets made with another block size get the even split that gives as
  // many blocks. (Until 2026-12-03 this assumed the L1 block alone, so once blocks grew it prefetched windows that
  // did not match them: ResNet-50, 10% kept, batch 32, 2 threads, 3 alternating processes of 6 calls, medians
  // 723 / 697 / 676 ms before, 678 / 593 / 639 ms after.)
  InputPrefetch in_place_prefetch;
  in_place_prefetch.channel_stride = g.channel_stride;
  in_place_prefetch.channels = g.in_channels;
  in_place_prefetch.block_channels = (g.in_channels + layout.blocks - 1) / layout.blocks;
  // Output rows [o0, o1) of image n at the tile of positions starting at q0, read from that image's planes,
  // then the epilogue while the tile is still in cache. `wide`: (o1 - o0) * sums_stride floats of scratch. `source`:
  // planes, or the input read in place (which prefetches its next windows) in whole vectors or exactly (nothing past a
  // window: where the storage ends after the last position).
  // `next_width`: positions of the tile this item computes next (0: none), whose input an in-place read prefetches
  // and whose output and residual lines are requested during this tile's epilogue.
  auto rows_at_tile = [&](const float* image_planes, int64_t n, int64_t o0, int64_t o1, int64_t q0, float* wide,
                          Source source, int64_t next_width) {
    const int64_t count = std::min(tile, positions - q0);
    const bool exact = source == Source::kInputExact;
    InputPrefetch prefetch;
    if (source != Source::kPlanes) {
      prefetch = in_place_prefetch;
      prefetch.next_tile_width = next_width;
    }
    kernels.rows_times_panel(image_planes + q0, off, vals, seg, layout, o0, o1, count, tile, wide, sums_stride, exact,
                             prefetch);
    // The output and residual lines of the tile this item computes next, requested while this tile's epilogue
    // runs (see prefetch_floats).
    const auto [next_lo, next_hi] = next_width > 0 && prefetch_next
                                        ? tile_output_span(q0 + count, next_width, g.plane_w, g.out_w, plane)
                                        : std::pair<int64_t, int64_t>{plane, plane};
    for (int64_t o = o0; o < o1; ++o) {
      const float* w_row = wide + (o - o0) * sums_stride - q0;  // indexed by position q
      float* dst = out_data + (n * g.out_channels + o) * out_stride;
      const float* r_row = res_data ? res_data + (n * g.out_channels + o) * res_stride : nullptr;
      if (r_row) prefetch_floats(r_row, next_lo, next_hi);
      if (!stream) {
        if (for_write) {
          prefetch_floats_for_write(dst, next_lo, next_hi);
        } else {
          prefetch_floats(dst, next_lo, next_hi);
        }
      }
      const float add = bias_data ? bias_data[o] : 0.0f;
      epilogue_tile(dst, w_row, r_row, q0, count, g.plane_w, g.out_w, add, activation, stream);
      // an aligned output's padding holds zeros (a 1x1 conv reading it in place sums it into positions it drops)
      if (out_stride > plane && q0 + count == positions) std::fill(dst + plane, dst + out_stride, 0.0f);
    }
  };
  // Zeros the floats after channel c's planes in an image's planes, and after the last channel the image's slack:
  // channels more than their planes apart (a 1x1 conv's: aligned_plane_stride, or its input's stride when its offsets
  // reach past the input) leave a gap, zeroed as an aligned output's padding is.
  auto clear_past_planes = [&](int64_t c, float* image_planes) {
    float* gap = image_planes + c * g.channel_stride + g.planes * g.plane_size;
    std::fill(gap, image_planes + (c + 1) * g.channel_stride, 0.0f);
    if (c == g.in_channels - 1) {
      std::memset(image_planes + used, 0, static_cast<size_t>(g.image_stride - used) * sizeof(float));
    }
  };
  auto fill_image = [&](int64_t n, int64_t c, float* image_planes) {
    fill_phase_planes(g, x_data + n * g.in_channels * g.input_channel_stride, c, image_planes, 0, g.plane_h);
    clear_past_planes(c, image_planes);
  };

  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  // Items of (row block, image, run of tiles) over images `image_floats` apart from images_of_thread() (where they
  // are for the thread that runs an item), a few per thread; `start`: what each thread does first (parallel_items).
  // `source_of(n)`: how image n is read. Row block first: the items a thread takes one after another mostly share
  // their rows' nonzeros. `position_first`: run of tiles first instead (at least two runs a thread), so that a
  // thread's own share is a band of output rows; `before_item(n, q_lo, q_end)` then runs before each item's tiles
  // (the position bands below fill the plane rows those positions read).
  const auto from_planes = [](int64_t) { return Source::kPlanes; };
  const auto nothing_first = [] {};
  const auto nothing_before = [](int64_t, int64_t, int64_t) {};
  auto share_out = [&](const auto& images_of_thread, int64_t image_floats, const auto& source_of, const auto& start,
                       bool position_first, const auto& before_item) {
    // A layer that reduces its channels reads more input than it writes output, and each block of its rows reads all
    // that input again: its rows are cut only until every thread has an item. 2-vCPU Zen 5, 2 threads, batch 1,
    // 5% kept, wide tiles, timed inside ResNet-50's call against cutting them until 4 items a thread, rounds grouped
    // by placement (bench/results/cpu-wide-tiles-ab-2026-12-06-amd-zen5.txt): 1024 -> 256 at 14x14 (2 tiles: 1 block
    // rather than 4) 1.34-1.39x with the vCPUs sharing an L3, 1.26-1.37x apart; 2048 -> 512 at 7x7 1.18x and
    // 1.20-1.22x; 512 -> 128 at 28x28 (5 tiles: 1 block rather than 2) 1.09x and 1.28-1.32x; but 512 -> 256 at
    // 28x28 0.93x together (1.13x apart).
    const WorkSplit split =
        split_work(g.out_channels, g.batch, positions, tile, nnz, 4 * threads,
                   g.in_channels > g.out_channels ? threads : 4 * threads, position_first ? 2 * threads : 1);
    const int64_t items_per_rows = g.batch * split.chunks, items_per_chunk = g.batch * split.row_blocks;
    parallel_items(split.row_blocks * items_per_rows, split.rows * sums_stride, start, [&](int64_t item, float* wide) {
      const float* base = images_of_thread();
      const int64_t rb = position_first ? item % split.row_blocks : item / items_per_rows;
      const int64_t n =
          position_first ? item % items_per_chunk / split.row_blocks : item % items_per_rows / split.chunks;
      const int64_t chunk = position_first ? item / items_per_chunk : item % split.chunks;
      const int64_t o0 = rb * split.rows, o1 = std::min(g.out_channels, o0 + split.rows);
      const int64_t q_lo = chunk * split.chunk_tiles * tile,
                    q_end = std::min(positions, q_lo + split.chunk_tiles * tile);
      before_item(n, q_lo, q_end);
      for (int64_t q0 = q_lo; q0 < q_end; q0 += tile) {
        rows_at_tile(base + n * image_floats, n, o0, o1, q0, wide, source_of(n),
                     q0 + tile < q_end ? std::min(tile, q_end - q0 - tile) : 0);
      }
      if (stream) store_fence();
    });
  };
  if (g.kernel_h == 1 && g.kernel_w == 1 && g.pad_h == 0 && g.pad_w == 0 && g.height == 1 && g.width == 1 &&
      g.batch >= kLanes && g.channel_stride == 1 && res_stride == plane) {
    // One pixel per channel: a linear layer over [N, C_in] (one stored plane of one float a channel, channels one
    // float apart, so each offset is its nonzero's input channel, checked above to be below in_channels).
    batch_as_vectors(op, x.view({g.batch, g.in_channels}), off, vals, seg, layout, g.out_channels, bias_data, res_data,
                     activation, out_data);
    return output;
  }
  // In place of planes a tile reads up to offset + positions floats into the image; other offsets take
  // the copy, whose slack covers any offset below in_channels * channel_stride.
  if (reads_input_directly(g) && max_offset + positions <= used) {
    // The input is its own phase plane: no copy (ResNet-50's 1x1 convs at 56x56 copied 3.2 MB an image). An image
    // is read in whole last vectors where every one stays inside the input's storage (the next image's channels, or
    // the padding of an aligned activation, see aligned_plane_stride), else with the last vector masked.
    const int64_t readable = floats_from_first(x);
    const int64_t reach = max_offset + round_up(positions, kernels.lanes);
    share_out([&] { return x_data; }, used,
              [&](int64_t n) { return n * used + reach <= readable ? Source::kInputWhole : Source::kInputExact; },
              nothing_first, false, nothing_before);
    return output;
  }
  if (g.batch >= 2 * threads) {
    // Enough images to share out: each item is one image, whose planes its thread builds in its own
    // scratch and reads back from L2 rather than from a batch-sized buffer (ResNet-50's layer1 1x1
    // convs at batch 32 would need 103 MB of planes).
    const WorkSplit split = split_work(g.out_channels, 1, positions, tile, nnz, 1, 1, 1);
    const int64_t planes_floats = round_up(g.image_stride, 16);  // the sums start on a line too
    parallel_items(g.batch, planes_floats + split.rows * sums_stride, [&](int64_t n, float* scratch) {
      float* wide = scratch + planes_floats;
      for (int64_t c = 0; c < g.in_channels; ++c) fill_image(n, c, scratch);
      for (int64_t o0 = 0; o0 < g.out_channels; o0 += split.rows) {
        for (int64_t q0 = 0; q0 < positions; q0 += tile) {
          rows_at_tile(scratch, n, o0, std::min(g.out_channels, o0 + split.rows), q0, wide, Source::kPlanes,
                       std::min(tile, std::max<int64_t>(0, positions - q0 - tile)));
        }
      }
      if (stream) store_fence();
    });
    return output;
  }
  const int64_t planes_bytes = g.batch * g.image_stride * static_cast<int64_t>(sizeof(float));
  const int64_t private_bytes = private_planes_bytes().load(std::memory_order_relaxed);
  // twice the threshold, saturating (set_private_planes_bytes takes any value below 2**63)
  const int64_t banded_bytes =
      private_bytes > std::numeric_limits<int64_t>::max() / 2 ? std::numeric_limits<int64_t>::max() : 2 * private_bytes;
  if (threads > 1 && planes_bytes <= banded_bytes) {
    // Private planes by position bands: the items go chunk of positions first (at least two chunks a thread), so a
    // thread's own share is a band of output rows, and each thread fills in its own buffer only the plane rows its
    // items' kept outputs read (marked per call: an item taken over from the other thread fills what it lacks).
    // Each thread then copies about its share of the planes rather than all of them, and in a chain of such layers
    // reads mostly rows it wrote itself. Up to twice the private threshold, as a thread fills about half.
    // 2-vCPU AMD EPYC Zen 5, 2 threads, 10% kept, batch 1, against every thread filling all the planes (the shared
    // copy above 512 KiB), rounds grouped by the vCPUs' measured round trip, 150 s a network, one process
    // (bench/results/cpu-position-band-planes-ab-2026-12-06-amd.txt): ResNet-18 1.025x (p20-p80 1.009-1.043x, 4354
    // rounds) with the vCPUs sharing the L3 and 1.061x (1.035-1.086x, 1028 rounds) apart; ResNet-50, whose 1x1
    // layers read their input in place by output channels, 1.000x and 1.008x. Taking the 1x1 layers' items by
    // position too did not change ResNet-50 (0.996x / 1.008x).
    const int64_t floats = g.batch * g.image_stride;
    // The rows below a position's row that its taps reach, and the columns right of it.
    const int64_t span_rows = g.plane_h - g.out_h, span_cols = g.plane_w - g.out_w;
    static thread_local std::vector<uint8_t> filled_rows;  // this thread's rows filled this call, [batch][plane_h]
    share_out([&] { return static_cast<const float*>(thread_planes(floats)); }, g.image_stride, from_planes,
              [&] {
                float* own = thread_planes(floats);
                filled_rows.assign(static_cast<size_t>(g.batch * g.plane_h), 0);
                for (int64_t n = 0; n < g.batch; ++n) {
                  for (int64_t c = 0; c < g.in_channels; ++c) clear_past_planes(c, own + n * g.image_stride);
                }
              },
              true,
              [&](int64_t n, int64_t q_lo, int64_t q_end) {  // each run of the rows these positions read not filled yet
                float* image = thread_planes(floats) + n * g.image_stride;
                const int64_t row_hi = std::min(g.plane_h, (q_end - 1 + span_cols) / g.plane_w + span_rows + 1);
                uint8_t* filled = filled_rows.data() + n * g.plane_h;
                for (int64_t r = q_lo / g.plane_w; r < row_hi;) {
                  if (filled[r]) {
                    ++r;
                    continue;
                  }
                  int64_t end = r;
                  while (end < row_hi && !filled[end]) filled[end++] = 1;
                  for (int64_t c = 0; c < g.in_channels; ++c) {
                    fill_phase_planes(g, x_data + n * g.in_channels * g.input_channel_stride, c, image, r, end);
                  }
                  r = end;
                }
              });
    return output;
  }
  if (planes_bytes <= private_bytes) {
    // Every thread builds all the planes in its own buffer (kPrivatePlanesBytes), then takes items as below.
    const int64_t floats = g.batch * g.image_stride;
    share_out([&] { return static_cast<const float*>(thread_planes(floats)); }, g.image_stride, from_planes,
              [&] {
                float* own = thread_planes(floats);
                for (int64_t n = 0; n < g.batch; ++n) {
                  for (int64_t c = 0; c < g.in_channels; ++c) fill_image(n, c, own + n * g.image_stride);
                }
              },
              false, nothing_before);
    return output;
  }
  at::Tensor planes = at::empty({g.batch, g.image_stride}, x.options());
  float* planes_data = planes.mutable_data_ptr<float>();
  // Channels copied per item: about 64 KiB of planes, so that taking an item (an atomic increment whose
  // cache line moves between cores) stays small against the copy; one channel an item made ResNet-50's
  // 2048-channel 7x7 layers take 2048 of them per call.
  const int64_t fill_block = std::max<int64_t>(1, (64 * 1024 / 4) / std::max<int64_t>(1, g.channel_stride));
  const int64_t fill_blocks = (g.in_channels + fill_block - 1) / fill_block;
  parallel_items(g.batch * fill_blocks, 0, [&](int64_t item, float*) {
    const int64_t n = item / fill_blocks, c0 = item % fill_blocks * fill_block;
    for (int64_t c = c0; c < std::min(g.in_channels, c0 + fill_block); ++c) {
      fill_image(n, c, planes_data + n * g.image_stride);
    }
  });
  share_out([&] { return static_cast<const float*>(planes_data); }, g.image_stride, from_planes, nothing_first, false,
            nothing_before);
  return output;
}

}  // namespace

CheckedOffsets::CheckedOffsets(const at::Tensor& source) {
  TORCH_CHECK(source.device().is_cpu() && source.scalar_type() == at::kInt && source.dim() == 1,
              "check_offsets: ", "offsets must be a 1-d int32 CPU tensor (from sparse_conv2d_offsets), got ",
              source.scalar_type(), " ", source.sizes(), " on ", source.device());
  at::NoGradGuard no_grad;
  offsets = source.clone(at::MemoryFormat::Contiguous);  // its own: no tensor outside this object shares its memory
  const int32_t* data = offsets.const_data_ptr<int32_t>();
  lo = hi = offsets.numel() > 0 ? data[0] : 0;  // the set's own extremes (the call checks lo >= 0, hi < its input)
  offset_range(data, offsets.numel(), &lo, &hi);
  bits = 0;
  for (int64_t k = 0; k < offsets.numel(); ++k) bits |= data[k];
}

at::Tensor sparse_conv2d(const at::Tensor& input, const at::Tensor& segments, const at::Tensor& offsets,
                         const at::Tensor& values, const std::vector<int64_t>& weight_shape,
                         const std::optional<at::Tensor>& bias, const std::vector<int64_t>& stride,
                         const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
                         const std::optional<at::Tensor>& residual, int64_t activation, int64_t input_channel_stride,
                         bool aligned_output, bool residual_reusable) {
  return sparse_conv2d_with(input, segments, offsets, std::nullopt, false, values, weight_shape, bias, stride, padding,
                            dilation, residual, activation, input_channel_stride, aligned_output, residual_reusable);
}

at::Tensor sparse_conv2d(const at::Tensor& input, const at::Tensor& segments, const CheckedOffsets& offsets,
                         const at::Tensor& values, const std::vector<int64_t>& weight_shape,
                         const std::optional<at::Tensor>& bias, const std::vector<int64_t>& stride,
                         const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
                         const std::optional<at::Tensor>& residual, int64_t activation, int64_t input_channel_stride,
                         bool aligned_output, bool residual_reusable) {
  return sparse_conv2d_with(input, segments, offsets.offsets, std::make_pair(offsets.lo, offsets.hi), false, values,
                            weight_shape, bias, stride, padding, dilation, residual, activation, input_channel_stride,
                            aligned_output, residual_reusable);
}

CheckedSegments::CheckedSegments(const at::Tensor& source) {
  constexpr const char* op = "check_segments";
  TORCH_CHECK(source.device().is_cpu() && source.scalar_type() == at::kLong && source.dim() == 1 && source.numel() >= 1,
              op, ": segments must be a nonempty 1-d int64 CPU tensor (from sparse_conv2d_offsets), got ",
              source.scalar_type(), " ", source.sizes(), " on ", source.device());
  at::NoGradGuard no_grad;
  segments = source.clone(at::MemoryFormat::Contiguous);  // its own: no tensor outside this object shares its memory
  check_segment_order(op, segments.const_data_ptr<int64_t>(), segments.numel());
}

at::Tensor sparse_conv2d(const at::Tensor& input, const CheckedSegments& segments, const CheckedOffsets& offsets,
                         const at::Tensor& values, const std::vector<int64_t>& weight_shape,
                         const std::optional<at::Tensor>& bias, const std::vector<int64_t>& stride,
                         const std::vector<int64_t>& padding, const std::vector<int64_t>& dilation,
                         const std::optional<at::Tensor>& residual, int64_t activation, int64_t input_channel_stride,
                         bool aligned_output, bool residual_reusable) {
  return sparse_conv2d_with(input, segments.segments, offsets.offsets, std::make_pair(offsets.lo, offsets.hi), true,
                            values, weight_shape, bias, stride, padding, dilation, residual, activation,
                            input_channel_stride, aligned_output, residual_reusable);
}

std::vector<at::Tensor> sparse_linear_pack(const at::Tensor& weight) {
  check_float_cpu("sparse_linear_pack", "weight", weight);
  TORCH_CHECK(weight.dim() == 2, "sparse_linear_pack: weight must be 2-d [out_features, in_features], got ",
              weight.dim(), "-d");
  TORCH_CHECK(weight.size(1) < std::numeric_limits<int32_t>::max(), "sparse_linear_pack: in_features too large");
  // The same layout as a conv with a 1x1 kernel: channel index = column.
  std::vector<at::Tensor> packed = sparse_conv2d_pack(weight.reshape({weight.size(0), weight.size(1), 1, 1}));
  return {packed[0], packed[1], packed[3]};
}

at::Tensor sparse_linear(const at::Tensor& input, const at::Tensor& row_ptr, const at::Tensor& column_index,
                         const at::Tensor& values, int64_t in_features, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "sparse_linear";
  check_float_cpu(op, "input", input);
  TORCH_CHECK(input.dim() >= 1 && input.size(-1) == in_features, op,
              ": input's last dimension must be in_features = ", in_features, ", got shape ", input.sizes());
  const int64_t out_features = row_ptr.numel() - 1;
  TORCH_CHECK(out_features >= 0, op, ": row_ptr must have out_features + 1 entries");
  check_packed(op, row_ptr, column_index, "column_index", values, out_features);
  const std::optional<at::Tensor> b = checked_bias(op, bias, out_features);
  const int64_t nnz = values.numel();
  const int32_t* col = column_index.const_data_ptr<int32_t>();

  at::NoGradGuard no_grad;
  const at::Tensor x = input.reshape({-1, in_features}).contiguous();
  const int64_t batch = x.size(0);
  std::vector<int64_t> out_shape(input.sizes().begin(), input.sizes().end());
  out_shape.back() = out_features;
  at::Tensor output = at::empty({batch, out_features}, x.options());
  const int64_t* rp = row_ptr.const_data_ptr<int64_t>();
  const float* vals = values.const_data_ptr<float>();
  const float* bias_data = b ? b->const_data_ptr<float>() : nullptr;
  const float* x_data = x.const_data_ptr<float>();
  float* out_data = output.mutable_data_ptr<float>();
  // Every column index must name an input feature, whatever the batch: below kLanes rows the gathers check the
  // indices as they read them (each clamped into range first, gathered_rows.cpp); otherwise, and where the output is
  // empty, one pass checks them all first.
  const bool gathered = batch < kLanes && output.numel() > 0;
  if (!gathered) {
    bool in_range = true;
    for (int64_t k = 0; k < nnz; ++k) in_range &= col[k] >= 0 && col[k] < in_features;
    TORCH_CHECK(in_range, op, ": column_index out of range [0, ", in_features, ")");
  }
  if (output.numel() == 0) return output.reshape(out_shape);

  if (gathered) {
    // Too few rows to fill a vector: a gathered dot product per (row, output)
    const Isa isa = sparse_isa();
    const int width = isa == Isa::kAvx512 ? 16 : isa == Isa::kAvx2 ? 8 : 1;
    std::atomic<bool> inside{true};
    at::parallel_for(0, out_features, 16, [&](int64_t begin, int64_t end) {
      for (int64_t n = 0; n < batch; ++n) {
        if (!gathered_row_products(x_data + n * in_features, in_features, rp, col, vals, bias_data,
                                   out_data + n * out_features, begin, end, width)) {
          inside.store(false, std::memory_order_relaxed);
        }
      }
    });
    TORCH_CHECK(inside.load(), op, ": column_index out of range [0, ", in_features, ")");
    return output.reshape(out_shape);
  }
  batch_as_vectors(op, x, col, vals, rp, row_major(1), out_features, bias_data, nullptr, kIdentity, out_data);
  return output.reshape(out_shape);
}

}  // namespace vpns
