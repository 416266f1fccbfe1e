// How far apart two CPUs are, as the sparse engine's threads see it: the round trip of one cache line between
// two threads pinned to two CPUs the calling thread may run on.
//
// Why: on a 2-vCPU KVM guest of an AMD EPYC host (Zen 4, 2026-12-05) the host places the two vCPUs either on cores
// that share an L3 (a round trip of 50-110 ns) or on cores that do not (310-360 ns; so the latencies say, the guest
// cannot see the host's topology), and moves them every few seconds to minutes. The sparse engine at batch 1 ran 1.39x
// (ResNet-18) and 1.45x (ResNet-50) slower in the second placement, 1.22x and 1.35x since private planes
// (docs/cpu-engine-runs.md), so its benchmarks record this figure beside the times they take
// (bench/private_planes_ab.py). Linux only.
#include "vpns_ops.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif

namespace vpns {

double core_round_trip_ns(int64_t rounds, int64_t first_cpu, int64_t second_cpu) {
  TORCH_CHECK(rounds >= 1, "core_round_trip_ns: rounds must be >= 1, got ", rounds);
#if defined(__linux__)
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  TORCH_CHECK(sched_getaffinity(0, sizeof(allowed), &allowed) == 0, "core_round_trip_ns: sched_getaffinity failed");
  std::vector<int> cpus;
  for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
    if (CPU_ISSET(cpu, &allowed)) cpus.push_back(cpu);
  }
  const int64_t count = static_cast<int64_t>(cpus.size());
  TORCH_CHECK(first_cpu >= 0 && second_cpu >= 0 && first_cpu < count && second_cpu < count && first_cpu != second_cpu,
              "core_round_trip_ns: first_cpu and second_cpu must be two different indices into the ", count,
              " CPUs the calling thread may run on, got ", first_cpu, " and ", second_cpu);
  auto pin = [](int cpu) {
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    return pthread_setaffinity_np(pthread_self(), sizeof(one), &one) == 0;
  };
  cpu_set_t caller;
  CPU_ZERO(&caller);
  TORCH_CHECK(pthread_getaffinity_np(pthread_self(), sizeof(caller), &caller) == 0,
              "core_round_trip_ns: pthread_getaffinity_np failed");
  // -1: the partner is starting; 0: both pinned; then 2i + 1 (sent by the caller) and 2i + 2 (the answer).
  struct alignas(64) Line {
    std::atomic<int64_t> value{-1};
    char padding[64 - sizeof(std::atomic<int64_t>)];
  } shared;  // a cache line of its own
  std::atomic<int64_t>& line = shared.value;
  std::atomic<bool> partner_pinned{true};
  std::thread partner([&] {
    partner_pinned = pin(cpus[second_cpu]);
    line.store(0, std::memory_order_release);
    for (int64_t i = 0; i < rounds; ++i) {
      while (line.load(std::memory_order_acquire) != 2 * i + 1) {
      }
      line.store(2 * i + 2, std::memory_order_release);
    }
  });
  const bool pinned = pin(cpus[first_cpu]);
  while (line.load(std::memory_order_acquire) != 0) {
  }
  const auto begin = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < rounds; ++i) {
    line.store(2 * i + 1, std::memory_order_release);
    while (line.load(std::memory_order_acquire) != 2 * i + 2) {
    }
  }
  const auto end = std::chrono::steady_clock::now();
  partner.join();
  const bool restored = pthread_setaffinity_np(pthread_self(), sizeof(caller), &caller) == 0;
  TORCH_CHECK(restored, "core_round_trip_ns: could not give the calling thread back its CPUs");
  TORCH_CHECK(pinned && partner_pinned, "core_round_trip_ns: could not pin the two threads to their CPUs");
  return std::chrono::duration<double, std::nano>(end - begin).count() / static_cast<double>(rounds);
#else
  (void)first_cpu;
  (void)second_cpu;
  TORCH_CHECK(false, "core_round_trip_ns: needs Linux (thread affinity)");
  return 0.0;
#endif
}

}  // namespace vpns
