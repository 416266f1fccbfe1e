// Multi-tensor top-k magnitude threshold: the k-th smallest |s| over many score tensors,
// bit-for-bit equal to torch.kthvalue(cat([s.abs().flatten() ...]), k).values.
//
// Design decisions. Timings: 2-core AMD EPYC KVM guest (AVX2; the build targets baseline
// x86-64), torch 2.14.1, torch.set_num_threads(2), float32 normal scores in the Conv2d/Linear
// weight shapes of torchvision ResNet-18 (N = 11.68M) / ResNet-50 (N = 25.50M), density 0.1.
// The machine was shared (load average 6-7 on 2 cores), so absolute times are inflated;
// the ratios were measured side by side, interleaved, medians of 7-11 runs.
// * Radix select on the bit pattern of |s|: for non-negative IEEE floats the unsigned bit pattern
//   orders like the value, so clearing the sign bit replaces abs, and no float compares or
//   copies are needed. NaN patterns (sign cleared) sort above +inf, which is exactly where
//   torch.kthvalue on the CPU puts NaN, so NaN inputs match the reference for free; a k that
//   lands on a NaN returns a NaN. -0.0 and +0.0 both become key 0, returned as +0.0.
// * 16-bit digits: 65536 bins x 4 bytes = 256 KB per thread stays in the 512 KB L2.
//   float32 = 2 passes, float16/bfloat16 = 1 pass (15 magnitude bits). float64: one histogram
//   pass, then, if the bin holding the k-th key is small (<= N/8), one gather pass and
//   nth_element on the survivors instead of three more full histogram passes.
// * Every pass walks all tensors as one flattened index space split over threads, so one huge
//   tensor and many tiny ones balance equally; nothing is concatenated; histograms are private
//   per thread and merged once.
// * Only the first pass touches a counter per key. Later passes and the warm pass test blocks of
//   keys branch-free (vectorized) and revisit the rare blocks holding a candidate: one thread,
//   11.7M keys, warm pass 38.5 ms with a branch per key -> 10 ms.
// * Warm start (float32/float64): one fused pass counts keys below a band around the previous
//   threshold and histograms only the band (float32: 65536 single-ulp bins, at least +-2^-9 =
//   0.195% around the hint, so a hit finishes in that one pass; float64: 65536 bins of 2^29
//   ulps, same relative width, then the usual gather). A miss falls back to the cold select,
//   so any hint is exact. float16/bfloat16 ignore the hint: the cold select is one pass.
// * Measured, ResNet-18 / ResNet-50, wall-clock medians:
//     release path clone+abs+cat+kthvalue : 1366 ms / 2760 ms
//     abs+cat+topk(N-k+1)                 :  857 ms / 2448 ms
//     cold select                         :   46 ms /   80 ms   (30x / 34x)
//     warm hit (hint = last step's t)     :   16 ms /   36 ms   (83x / 77x)
//     warm miss (hint = 2t)               :   64 ms /  110 ms   (21x / 25x; +40% over cold)
//   The same machine quiet (load < 1.5, 2026-11-24, median of repeated calls): release path
//   320 ms / 655 ms, cold select 7.5 ms / 19.3 ms (43x / 34x), warm hit 3.2 ms / 7.6 ms.
//   Hence the cpp backend (vpns_fast/ops/cpp_backend.py) passes the last threshold as a hint
//   only while the previous step stayed inside the band.
#include "vpns_ops.h"

#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

namespace {

constexpr int kDigitBits = 16;
constexpr int64_t kBins = int64_t{1} << kDigitBits;
// Below this many elements a thread's start-up costs more than its share of the work.
constexpr int64_t kGrainSize = int64_t{1} << 16;
// Candidate sets this small are selected directly (nth_element) instead of by histograms.
constexpr int64_t kSmallSelect = 4096;

template <typename Key>
constexpr Key magnitude_mask() {
  return static_cast<Key>(std::numeric_limits<Key>::max() >> 1);  // every bit but the sign
}

// All score tensors seen as one flat array of unsigned bit patterns, without copying.
template <typename Key>
struct FlatKeys {
  std::vector<const Key*> data;
  std::vector<int64_t> starts;  // starts[i]: flat index of tensor i's first element
  int64_t total = 0;

  // Calls visit(pointer, count) for each contiguous piece of the flat range [begin, end).
  template <typename Visit>
  void for_each_piece(int64_t begin, int64_t end, Visit&& visit) const {
    auto it = std::upper_bound(starts.begin(), starts.end(), begin);
    size_t i = static_cast<size_t>(it - starts.begin()) - 1;
    while (begin < end) {
      const int64_t piece_end = std::min(end, i + 1 < starts.size() ? starts[i + 1] : total);
      visit(data[i] + (begin - starts[i]), piece_end - begin);
      begin = piece_end;
      ++i;
    }
  }
};

// Called from inside an outer parallel region, at::parallel_for runs inline and the thread
// number is the outer one, possibly >= get_num_threads(); only one slot is then in use.
inline int64_t this_thread_slot(int64_t threads) { return std::min<int64_t>(at::get_thread_num(), threads - 1); }

// Runs fill(pointer, count, histograms) over every element, each thread into its own `lanes`
// histograms of `bins` counters (laid out one after another), and returns the merged counts.
template <typename Key, typename Counter, typename Fill>
std::vector<int64_t> parallel_histogram(const FlatKeys<Key>& keys, int64_t bins, int64_t lanes, Fill&& fill) {
  const int64_t threads = at::get_num_threads();
  const int64_t per_thread_size = bins * lanes;
  std::vector<Counter> per_thread(static_cast<size_t>(threads * per_thread_size), 0);
  at::parallel_for(0, keys.total, kGrainSize, [&](int64_t begin, int64_t end) {
    Counter* hist = per_thread.data() + this_thread_slot(threads) * per_thread_size;
    keys.for_each_piece(begin, end, [&](const Key* p, int64_t n) { fill(p, n, hist); });
  });
  std::vector<int64_t> merged(static_cast<size_t>(bins), 0);
  for (int64_t h = 0; h < threads * lanes; ++h) {
    const Counter* hist = per_thread.data() + h * bins;
    for (int64_t b = 0; b < bins; ++b) merged[b] += static_cast<int64_t>(hist[b]);
  }
  return merged;
}

// Filtered passes touch a histogram for ~0.1-0.3% of the keys. A branch per key cost 14 ms per
// 11.7M keys on one core; testing a block of keys branch-free (vectorized) first and revisiting
// only blocks that hold a candidate costs 5.5 ms, the speed of a plain sum.
constexpr int64_t kFilterBlock = 32;

// Calls on_candidate(key) for every magnitude key with is_candidate(key) and returns how many
// keys are below `count_below`. The block loop vectorizes only because every value it touches
// is a local: a counter or bound reached through a reference could alias p[] (same integer
// type), so lambdas here capture by value.
template <typename Key, typename IsCandidate, typename OnCandidate>
inline int64_t scan_for_rare_candidates(const Key* p, int64_t n, Key count_below, IsCandidate is_candidate,
                                        OnCandidate on_candidate) {
  constexpr Key mask = magnitude_mask<Key>();
  int64_t below = 0;
  int64_t i = 0;
  for (; i + kFilterBlock <= n; i += kFilterBlock) {
    Key any = 0;
    Key block_below = 0;
    for (int64_t j = 0; j < kFilterBlock; ++j) {
      const Key key = p[i + j] & mask;
      any |= static_cast<Key>(is_candidate(key));
      block_below += static_cast<Key>(key < count_below);
    }
    below += block_below;
    if (any) {
      for (int64_t j = 0; j < kFilterBlock; ++j) {
        const Key key = p[i + j] & mask;
        if (is_candidate(key)) on_candidate(key);
      }
    }
  }
  for (; i < n; ++i) {
    const Key key = p[i] & mask;
    below += key < count_below;
    if (is_candidate(key)) on_candidate(key);
  }
  return below;
}

// What is known about the k-th key: it is one of the `candidates` keys whose bits above
// `low_bits` equal `prefix`, and it is the `rank`-th smallest (1-based) of them.
template <typename Key>
struct Selection {
  Key prefix;
  int low_bits;
  int64_t rank;
  int64_t candidates;
};

// Narrows `sel` to the histogram bin that holds its rank.
template <typename Key>
void descend(Selection<Key>& sel, const std::vector<int64_t>& hist, Key bin_base, int digit_bits) {
  int64_t below = 0;
  for (size_t b = 0; b < hist.size(); ++b) {
    if (sel.rank <= below + hist[b]) {
      sel.prefix = static_cast<Key>(bin_base + b);
      sel.low_bits -= digit_bits;
      sel.rank -= below;
      sel.candidates = hist[b];
      return;
    }
    below += hist[b];
  }
  TORCH_INTERNAL_ASSERT(false, "topk_threshold: rank ", sel.rank, " beyond the histogram total ", below);
}

// One radix pass: histogram of the next digit among the current candidates.
template <typename Key, typename Counter>
void radix_pass(const FlatKeys<Key>& keys, Selection<Key>& sel) {
  const int digit_bits = std::min(kDigitBits, sel.low_bits);
  const int shift = sel.low_bits - digit_bits;
  const Key digit_mask = static_cast<Key>((Key{1} << digit_bits) - 1);
  const Key prefix = sel.prefix;
  const int prefix_shift = sel.low_bits;
  constexpr Key mask = magnitude_mask<Key>();
  constexpr int key_bits = 8 * sizeof(Key);
  const int64_t bins = int64_t{1} << digit_bits;
  std::vector<int64_t> hist;
  if (prefix_shift == key_bits - 1) {  // first pass: every element is a candidate
    // Scores cluster in a few hundred bins, so consecutive increments often hit one counter and
    // wait on the previous store; alternating two histograms cut 9.3 ms to 7.4 ms per 11.7M keys.
    hist = parallel_histogram<Key, Counter>(keys, bins, 2, [&](const Key* p, int64_t n, Counter* h) {
      Counter* h2 = h + bins;
      int64_t i = 0;
      for (; i + 1 < n; i += 2) {
        h[static_cast<Key>(p[i] & mask) >> shift]++;
        h2[static_cast<Key>(p[i + 1] & mask) >> shift]++;
      }
      if (i < n) h[static_cast<Key>(p[i] & mask) >> shift]++;
    });
  } else {
    hist = parallel_histogram<Key, Counter>(keys, bins, 1, [&](const Key* p, int64_t n, Counter* h) {
      scan_for_rare_candidates(
          p, n, Key{0}, [prefix, prefix_shift](Key key) { return (key >> prefix_shift) == prefix; },
          [h, shift, digit_mask](Key key) { h[(key >> shift) & digit_mask]++; });
    });
  }
  descend(sel, hist, static_cast<Key>(prefix << digit_bits), digit_bits);
}

// Finishes the selection by copying the few remaining candidates out and selecting among them.
template <typename Key>
Key gather_and_select(const FlatKeys<Key>& keys, const Selection<Key>& sel) {
  const int64_t threads = at::get_num_threads();
  std::vector<std::vector<Key>> per_thread(static_cast<size_t>(threads));
  const Key prefix = sel.prefix;
  const int prefix_shift = sel.low_bits;
  at::parallel_for(0, keys.total, kGrainSize, [&](int64_t begin, int64_t end) {
    auto& out = per_thread[this_thread_slot(threads)];
    keys.for_each_piece(begin, end, [&](const Key* p, int64_t n) {
      scan_for_rare_candidates(
          p, n, Key{0}, [prefix, prefix_shift](Key key) { return (key >> prefix_shift) == prefix; },
          [&out](Key key) { out.push_back(key); });
    });
  });
  std::vector<Key> candidates;
  candidates.reserve(static_cast<size_t>(sel.candidates));
  for (auto& part : per_thread) candidates.insert(candidates.end(), part.begin(), part.end());
  TORCH_INTERNAL_ASSERT(static_cast<int64_t>(candidates.size()) == sel.candidates);
  std::nth_element(candidates.begin(), candidates.begin() + (sel.rank - 1), candidates.end());
  return candidates[sel.rank - 1];
}

// The fused warm-start pass. Returns false when the k-th key is outside the band.
template <typename Key, typename Counter>
bool warm_pass(const FlatKeys<Key>& keys, Key hint_key, int bin_shift, Selection<Key>& sel) {
  constexpr Key mask = magnitude_mask<Key>();
  const Key hint_bin = static_cast<Key>((hint_key & mask) >> bin_shift);
  const Key first_bin = hint_bin > kBins / 2 ? static_cast<Key>(hint_bin - kBins / 2) : Key{0};
  const Key band_lo = static_cast<Key>(first_bin << bin_shift);
  const Key band_span = static_cast<Key>(static_cast<Key>(kBins) << bin_shift);  // keys >= band_lo + span are above
  // The last counter holds how many keys lie below the band.
  std::vector<int64_t> hist =
      parallel_histogram<Key, Counter>(keys, kBins + 1, 1, [&](const Key* p, int64_t n, Counter* h) {
        h[kBins] += static_cast<Counter>(scan_for_rare_candidates(
            p, n, band_lo,
            [band_lo, band_span](Key key) {
              return static_cast<Key>(key - band_lo) < band_span;
            },  // wraps below band_lo
            [h, band_lo, bin_shift](Key key) { h[static_cast<Key>(key - band_lo) >> bin_shift]++; }));
      });
  const int64_t below = hist[kBins];
  hist.pop_back();
  int64_t in_band = 0;
  for (int64_t c : hist) in_band += c;
  if (sel.rank <= below || sel.rank > below + in_band) return false;
  sel.rank -= below;
  sel.low_bits = bin_shift + kDigitBits;  // descend() lands on low_bits == bin_shift
  descend(sel, hist, first_bin, kDigitBits);
  return true;
}

template <typename Key, typename Counter>
Key select_kth_key(const FlatKeys<Key>& keys, int64_t k, std::optional<Key> hint_key, int warm_bin_shift) {
  constexpr int key_bits = 8 * sizeof(Key);
  Selection<Key> sel{Key{0}, key_bits - 1, k, keys.total};
  if (hint_key && warm_bin_shift >= 0) {
    Selection<Key> warm = sel;
    if (warm_pass<Key, Counter>(keys, *hint_key, warm_bin_shift, warm)) sel = warm;
  }
  // float64 would need four histogram passes; a small candidate set is cheaper to gather. Tiny
  // inputs skip the histograms altogether: zeroing and merging 65536 bins would dominate.
  const int64_t gather_limit = keys.total / 8;
  while (sel.low_bits > 0) {
    if (sel.candidates <= kSmallSelect || (sel.low_bits > kDigitBits && sel.candidates <= gather_limit)) {
      return gather_and_select(keys, sel);
    }
    radix_pass<Key, Counter>(keys, sel);
  }
  return sel.prefix;
}

template <typename Key>
Key select_kth_key(const FlatKeys<Key>& keys, int64_t k, std::optional<Key> hint_key, int warm_bin_shift) {
  // 32-bit counters halve the histogram footprint; a thread never counts more than N elements.
  if (keys.total <= static_cast<int64_t>(std::numeric_limits<uint32_t>::max())) {
    return select_kth_key<Key, uint32_t>(keys, k, hint_key, warm_bin_shift);
  }
  return select_kth_key<Key, uint64_t>(keys, k, hint_key, warm_bin_shift);
}

template <typename Key>
FlatKeys<Key> flatten(const std::vector<at::Tensor>& contiguous) {
  FlatKeys<Key> keys;
  for (const auto& t : contiguous) {
    if (t.numel() == 0) continue;
    keys.data.push_back(static_cast<const Key*>(t.const_data_ptr()));
    keys.starts.push_back(keys.total);
    keys.total += t.numel();
  }
  return keys;
}

template <typename Key, typename Scalar>
at::Tensor threshold_of(const std::vector<at::Tensor>& contiguous, int64_t k, std::optional<double> hint,
                        int warm_bin_shift, at::ScalarType dtype) {
  static_assert(sizeof(Key) == sizeof(Scalar));
  const FlatKeys<Key> keys = flatten<Key>(contiguous);
  std::optional<Key> hint_key;
  if (hint) {
    const Scalar value = static_cast<Scalar>(*hint);
    Key bits;
    std::memcpy(&bits, &value, sizeof(Key));
    hint_key = bits;
  }
  const Key key = select_kth_key<Key>(keys, k, hint_key, warm_bin_shift);
  at::Tensor out = at::empty({}, at::TensorOptions().dtype(dtype).device(at::kCPU));
  std::memcpy(out.mutable_data_ptr(), &key, sizeof(Key));
  return out;
}

}  // namespace

namespace vpns {

at::Tensor topk_threshold(const std::vector<at::Tensor>& tensors, int64_t k, std::optional<double> hint) {
  TORCH_CHECK(!tensors.empty(), "topk_threshold: tensors must hold at least one tensor, got an empty list");
  const at::ScalarType dtype = tensors[0].scalar_type();
  int64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), "topk_threshold: tensors[", i, "] is undefined");
    TORCH_CHECK(t.device().is_cpu(), "topk_threshold: tensors[", i, "] must be a CPU tensor, got one on ", t.device());
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble || t.scalar_type() == at::kHalf ||
                    t.scalar_type() == at::kBFloat16,
                "topk_threshold: tensors[", i, "] must be float32, float64, float16 or bfloat16, got ",
                t.scalar_type());
    TORCH_CHECK(t.scalar_type() == dtype, "topk_threshold: all tensors must share one dtype; tensors[0] is ", dtype,
                " but tensors[", i, "] is ", t.scalar_type());
    total += t.numel();
  }
  TORCH_CHECK(k >= 1 && k <= total, "topk_threshold: k must be in [1, N] = [1, ", total,
              "] (N = total element count), got ", k);
  // Only the bits are read, so autograd must not record the copies made for strided inputs.
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> contiguous;
  contiguous.reserve(tensors.size());
  for (const auto& t : tensors) contiguous.push_back(t.contiguous());
  switch (dtype) {
    case at::kFloat: return threshold_of<uint32_t, float>(contiguous, k, hint, /*warm_bin_shift=*/0, dtype);
    case at::kDouble: return threshold_of<uint64_t, double>(contiguous, k, hint, /*warm_bin_shift=*/29, dtype);
    case at::kHalf: return threshold_of<uint16_t, at::Half>(contiguous, k, hint, /*warm_bin_shift=*/-1, dtype);
    default: return threshold_of<uint16_t, at::BFloat16>(contiguous, k, hint, /*warm_bin_shift=*/-1, dtype);
  }
}

}  // namespace vpns
