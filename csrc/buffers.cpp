// Large activations of the sparse CPU engine come from a small cache of already-touched buffers
// instead of fresh allocations.
//
// Why: glibc serves blocks above its mmap threshold (at most 32 MiB) with a fresh mmap and returns
// them with munmap on free, so every such tensor costs a page fault per 4 KiB on first touch, every
// call. Measured on the 2-core KVM machine (torch 2.14.1, 2 threads, batch 32): allocating a 103 MB
// tensor and adding 1 into it took 43-46 ms, against 5.7-7.6 ms once the process ran with
// MALLOC_MMAP_THRESHOLD_=4000000000 MALLOC_TRIM_THRESHOLD_=8000000000; ResNet-18's stem output at
// batch 32 (64x112x112 per image) is such a tensor. Tensors below kMinBytes are left to malloc,
// whose heap already reuses them.
#include "vpns_ops.h"

#include <cstdlib>
#include <map>
#include <mutex>
#include <new>

namespace {

constexpr size_t kMinBytes = size_t{16} << 20;
constexpr size_t kAlignment = 64;

class BufferCache {
 public:
  void* take(size_t bytes) {
    {
      const std::lock_guard<std::mutex> lock(mutex_);
      const auto it = free_.find(bytes);
      if (it != free_.end()) {
        void* buffer = it->second;
        free_.erase(it);
        held_ -= bytes;
        return buffer;
      }
    }
    void* buffer = nullptr;
    if (posix_memalign(&buffer, kAlignment, bytes) != 0) throw std::bad_alloc();
    return buffer;
  }

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

}  // namespace

namespace vpns {

at::Tensor empty_activation(at::IntArrayRef sizes) {
  int64_t numel = 1;
  for (const int64_t size : sizes) numel *= size;
  const size_t bytes = static_cast<size_t>(numel) * sizeof(float);
  if (bytes < kMinBytes) return at::empty(sizes, at::kFloat);
  void* buffer = cache().take(bytes);
  return at::from_blob(
      buffer, sizes, [bytes](void* data) { cache().give_back(data, bytes); }, at::TensorOptions().dtype(at::kFloat));
}

int64_t cached_activation_bytes() { return cache().held(); }

int64_t set_activation_cache_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "set_activation_cache_limit: bytes must be >= 0, got ", bytes);
  return cache().set_limit(bytes);
}

}  // namespace vpns
