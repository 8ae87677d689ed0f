// The teacher cache's work over the examples of a batch runs on a small persistent std::thread
// pool (thread_pool.cpp): no OpenMP, so it does not fight PyTorch's intra-op threads, and it
// survives fork() (the child starts a fresh pool: the parent's worker threads do not exist there).
#pragma once

#include <cstdint>
#include <functional>

namespace tbf_cache {

// Runs fn(0..n-1) on the calling thread plus up to threads-1 pool workers, with dynamic
// scheduling (ragged examples differ in cost by up to (512/1)^2).  The first exception a call of
// fn throws stops the job and is rethrown here.  One job at a time; callers from several Python
// threads queue.
void parallel_for(int64_t n, int64_t threads, const std::function<void(int64_t)>& fn);

}  // namespace tbf_cache
