// The persistent thread pool behind parallel_for (thread_pool.h).
#include "thread_pool.h"

#include <pthread.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

namespace tbf_cache {
namespace {

class ThreadPool {
 public:
  explicit ThreadPool(int workers) {
    for (int i = 0; i < workers; ++i) threads_.emplace_back([this] { worker_loop(); });
    for (auto& t : threads_) t.detach();  // never joined: the pool lives until the process exits
  }

  int workers() const { return static_cast<int>(threads_.size()); }

  void run(int64_t n, int helpers, const std::function<void(int64_t)>& fn) {
    std::lock_guard<std::mutex> job_lock(job_mu_);
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      n_ = n;
      next_.store(0);
      failed_.store(false);
      error_ = nullptr;
      helpers_left_ = std::min(helpers, workers());
      closed_ = false;
      ++generation_;
    }
    cv_.notify_all();
    work();
    std::exception_ptr error;
    {
      std::unique_lock<std::mutex> lk(mu_);
      closed_ = true;
      done_cv_.wait(lk, [this] { return active_ == 0; });
      error = error_;
      fn_ = nullptr;
    }
    if (error) std::rethrow_exception(error);
  }

 private:
  void work() {
    for (;;) {
      if (failed_.load(std::memory_order_relaxed)) return;
      const int64_t i = next_.fetch_add(1);
      if (i >= n_) return;
      try {
        (*fn_)(i);
      } catch (...) {
        std::lock_guard<std::mutex> lk(mu_);
        if (!error_) error_ = std::current_exception();
        failed_.store(true);
      }
    }
  }

  void worker_loop() {
    uint64_t seen = 0;
    for (;;) {
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return generation_ != seen; });
        seen = generation_;
        if (closed_ || helpers_left_ <= 0) continue;
        --helpers_left_;
        ++active_;
      }
      work();
      {
        std::lock_guard<std::mutex> lk(mu_);
        --active_;
      }
      done_cv_.notify_all();
    }
  }

  std::vector<std::thread> threads_;
  std::mutex job_mu_;  // one job at a time
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int64_t)>* fn_ = nullptr;
  int64_t n_ = 0;
  std::atomic<int64_t> next_{0};
  std::atomic<bool> failed_{false};
  std::exception_ptr error_;
  int helpers_left_ = 0;
  int active_ = 0;
  bool closed_ = true;
  uint64_t generation_ = 0;
};

ThreadPool* g_pool = nullptr;
alignas(std::mutex) unsigned char g_pool_mu_storage[sizeof(std::mutex)];
std::mutex* g_pool_mu = new (g_pool_mu_storage) std::mutex();

void reset_pool_after_fork() {
  // The child has only the forking thread: forget the parent's pool (its threads are gone and its
  // mutexes may be held) and re-create the lock; a new pool starts on first use.
  g_pool = nullptr;
  g_pool_mu = new (g_pool_mu_storage) std::mutex();
}

[[maybe_unused]] const bool g_atfork_registered = [] {
  pthread_atfork(nullptr, nullptr, reset_pool_after_fork);
  return true;
}();

ThreadPool& pool() {
  std::lock_guard<std::mutex> lk(*g_pool_mu);
  if (g_pool == nullptr) {
    const int hw = static_cast<int>(std::min(64u, std::thread::hardware_concurrency()));
    g_pool = new ThreadPool(std::max(1, hw - 1));  // the caller is the other thread
  }
  return *g_pool;
}

}  // namespace

void parallel_for(int64_t n, int64_t threads, const std::function<void(int64_t)>& fn) {
  if (threads <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  pool().run(n, static_cast<int>(std::min<int64_t>(threads - 1, n - 1)), fn);
}

}  // namespace tbf_cache
