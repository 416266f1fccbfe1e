// Large activations of the sparse CPU engine come from a small cache of already-touched buffers
// instead of fresh allocations.
//
// Why: glibc serves blocks above its mmap threshold (at most 32 MiB) with a fresh mmap and returns
// them with munmap on free, so every such tensor costs a page fault per 4 KiB on first touch, every
// call. Measured on the 2-core KVM machine (torch 2.14.1, 2 threads, batch 32): allocating a 103 MB
// tensor and adding 1 into it took 43-46 ms, against 5.7-7.6 ms once the process ran with
// MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=8000000000; ResNet-18's stem output at
// batch 32 (64x112x112 per image) is such a tensor. Tensors below kMinBytes are left to malloc.
#include "vpns_ops.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <new>

namespace {

// 1 MiB rather than 16, so that the outputs of 1-16 MiB (ResNet-50's at batch 1, its 7x7 layers at batch 32)
// are recycled too. Measured against 16 MiB, 2 threads, 10% kept, per-round ratios of interleaved
// rounds: ResNet-50 batch 1 1.06x (p20-p80 0.99-1.14x), batch 32 1.047x (1.03-1.09x); ResNet-18 batch 32
// 1.00x. Then 64 KiB rather than 1 MiB: most of ResNet-50's conv outputs at batch 1 from layer2 on (0.1-0.8 MB) came
// from torch's allocator, whose posix_memalign of such blocks (glibc's _int_malloc, on the thread that starts each step
// while the other waits) showed in that thread's samples at 5% kept, and much less with them from here (perf, 2-vCPU
// Intel Xeon, 2 threads, 2026-12-07; its samples not kept). With the plans' checked segments (csrc/call_plan.cpp), two
// builds in alternating processes: ResNet-50 at 5% kept, batch 1, 1.069x (p20-p80 1.030-1.122x, 12 rounds;
// bench/results/cpu-serial-work-ab-resnet50-d0.05-b1-2026-12-07-intel-xeon.txt).
constexpr size_t kMinBytes = size_t{64} << 10;
constexpr size_t kAlignment = 64;

class BufferCache {
 public:
  // A buffer of at least `bytes` (*held_bytes: its real size): an idle one up to 1.25x as large, else a
  // new one. The slack lets outputs of nearby sizes share buffers (a model at several input sizes).
  void* take(size_t bytes, size_t* held_bytes) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      const auto it = free_.lower_bound(bytes);
      if (it != free_.end() && it->first <= bytes + bytes / 4) {
        void* buffer = it->second;
        *held_bytes = it->first;
        held_ -= it->first;
        free_.erase(it);
        return buffer;
      }
    }
    void* buffer = nullptr;
    if (posix_memalign(&buffer, kAlignment, bytes) != 0) throw std::bad_alloc();
    *held_bytes = bytes;
    return buffer;
  }

  // Equal-sized idle buffers go out oldest first. Tried, not kept: the one given back last first (the likeliest
  // still in cache): ResNet-50 / ResNet-18 at 10% kept, batch 1, 2 threads, 16 interleaved rounds in one process
  // (2-core AMD EPYC, 2026-12-04): 1.010x (p20-p80 0.90-1.07x) / 0.977x (0.93-1.03x); again for buffers below 1 MiB
  // once the cache took them (2-vCPU Intel Xeon, 2026-12-07, two builds in alternating processes, ResNet-50 at 5%
  // kept, batch 1, 8 rounds): 0.993x (0.961-1.021x; bench/results/cpu-tried-not-kept-2026-12-07-intel-xeon.txt).
  void give_back(void* buffer, size_t bytes) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      if (held_ + bytes <= limit_) {
        free_.emplace(bytes, buffer);
        held_ += bytes;
        return;
      }
    }
    std::free(buffer);
  }

  int64_t held() {
    const std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(held_);
  }

  int64_t set_limit(int64_t limit) {
    std::multimap<size_t, void*> dropped;
    int64_t previous;
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      previous = static_cast<int64_t>(limit_);
      limit_ = static_cast<size_t>(limit);
      while (held_ > limit_ && !free_.empty()) {  // largest first
        auto last = std::prev(free_.end());
        held_ -= last->first;
        dropped.insert(*last);
        free_.erase(last);
      }
    }
    for (const auto& entry : dropped) std::free(entry.second);
    return previous;
  }

 private:
  std::mutex mutex_;
  std::multimap<size_t, void*> free_;  // idle buffers by size in bytes
  size_t held_ = 0;
  // Idle bytes kept at most: ResNet-50 at batch 32 frees 51-103 MB activations a few at a time.
  size_t limit_ = size_t{1} << 30;
};

// Never destroyed: tensors still alive at interpreter exit give their buffers back to it.
BufferCache& cache() {
  static BufferCache* instance = new BufferCache();
  return *instance;
}

struct CachedBlock {
  void* data;
  size_t bytes;
};

void release_block(void* context) {
  const CachedBlock* block = static_cast<CachedBlock*>(context);
  cache().give_back(block->data, block->bytes);
  delete block;
}

// The storages' allocator, so that a tensor from the cache stays an ordinary resizable tensor: resize_ and
// out= arguments that grow it allocate through here (large sizes from the cache, small ones from torch's
// CPU allocator).
class ActivationAllocator final : public c10::Allocator {
 public:
  explicit ActivationAllocator(size_t min_bytes) : min_bytes_(min_bytes) {}

  c10::DataPtr allocate(size_t bytes) override {
    if (bytes < min_bytes_) return c10::GetDefaultCPUAllocator()->allocate(bytes);
    size_t held = 0;
    void* data = cache().take(bytes, &held);
    return {data, new CachedBlock{data, held}, &release_block, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override { default_copy_data(dest, src, count); }

 private:
  size_t min_bytes_;  // smaller blocks come from torch's CPU allocator
};

ActivationAllocator& allocator() {
  static ActivationAllocator* instance = new ActivationAllocator(kMinBytes);
  return *instance;
}

// Every size from the cache: a kernel's scratch of any size, taken and given back on every call. From malloc (below
// kMinBytes, 1 MiB then), Winograd's two chunk buffers (1.04 MB each for 64 channels at 56x56, batch 1), with its 0.8
// MB output, made glibc give the heap's top back and fault it in again on every call in about one process in five (672
// page faults a call, 0.19 -> 0.94-1.0 ms; glibc documents a trim threshold that follows the largest block freed so
// far). With the two buffers from here and the output still from malloc, 16 processes of 16 ran without faults
// (0.17-0.18 ms); since the 64 KiB threshold that output comes from the cache too.
ActivationAllocator& scratch_allocator() {
  static ActivationAllocator* instance = new ActivationAllocator(1);
  return *instance;
}

}  // namespace

namespace vpns {

at::Tensor empty_activation(at::IntArrayRef sizes, at::MemoryFormat memory_format) {
  int64_t numel = 1;
  for (const int64_t size : sizes) numel *= size;
  if (static_cast<size_t>(numel) * sizeof(float) < kMinBytes) {
    return at::empty(sizes, at::TensorOptions().dtype(at::kFloat).memory_format(memory_format));
  }
  return at::detail::empty_generic(sizes, &allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), at::kFloat,
                                   memory_format);
}

at::Tensor empty_scratch(at::IntArrayRef sizes) {
  return at::detail::empty_generic(sizes, &scratch_allocator(), c10::DispatchKeySet(c10::DispatchKey::CPU), at::kFloat,
                                   std::nullopt);
}
at::Tensor contiguous_activation(const at::Tensor& t) {
  if (t.is_contiguous()) return t;
  at::Tensor out = empty_activation(t.sizes());
  out.copy_(t);
  return out;
}

int64_t cached_activation_bytes() { return cache().held(); }

int64_t set_activation_cache_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "set_activation_cache_limit: bytes must be >= 0, got ", bytes);
  return cache().set_limit(bytes);
}

}  // namespace vpns
