// Work sharing for the CPU kernels (cpu_attention.cc, cpu_matmul.cc) over XLA's own CPU thread
// pool, as the FFI hands it to a custom call.
#pragma once

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace rlver {

// Runs `worker(i)` for i in [0, items) on the calling thread and on helpers from `pool`, where
// `auto worker = make_worker();` is made once per thread that takes an item (per-thread scratch
// lives in it). Items are handed out one at a time; each is done by one thread, so results that
// depend only on the item do not depend on the thread count or the schedule.
//
// The caller never waits for a helper that has not started (the pool may be busy, or as small
// as the caller alone): it takes items until none is left, then waits only for items already
// taken. A helper that starts late finds none and leaves without touching `make_worker`; the
// shared counters outlive the call for it.
template <typename MakeWorker>
void ParallelFor(int64_t items, xla::ffi::ThreadPool& pool, MakeWorker& make_worker) {
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  MakeWorker* make = &make_worker;  // dereferenced only while an item is held: still alive
  auto run = [counters, items, make] {
    int64_t i = counters->next.fetch_add(1, std::memory_order_relaxed);
    if (i >= items) return;
    auto worker = (*make)();
    do {
      worker(i);
      counters->done.fetch_add(1, std::memory_order_release);
    } while ((i = counters->next.fetch_add(1, std::memory_order_relaxed)) < items);
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), items) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule(decltype(run)(run));  // a copy each
  run();
  while (counters->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

}  // namespace rlver
