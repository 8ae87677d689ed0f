// Teacher-activation cache: op schemas, argument checks and the CPU path.
//
// Ops (namespace tinybert_fast_cache; Python wrapper: tinybert_fast/cache.py):
//   crc32c(data, crc)            CRC32C (Castagnoli) of a byte tensor, continuing from `crc`
//   record_bytes(lengths, layout)  the size in bytes of the record of each example length
//   pack(...)                    padded teacher outputs -> unpadded records (+ offsets, CRCs)
//   gather(...)                  records from mapped files -> a (pinned) staging buffer, verified
//   unpack(...)                  records -> padded tensors + attention mask (CPU here; CUDA in
//                                cuda/teacher_cache_kernel.cu)
// The record layout is in teacher_cache.h.  Work over the examples of a batch runs on a small
// persistent std::thread pool (no OpenMP, so it does not fight PyTorch's intra-op threads and
// survives fork()).
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/version.h>

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cfloat>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <functional>
#include <mutex>
#include <new>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <nmmintrin.h>
#define TBF_X86_CRC 1
#endif

#include "teacher_cache.h"

// What this library was compiled against, readable without loading it: tinybert_fast/cache.py
// checks it before import, because PyTorch's C++ ABI changes between minor releases (loading a
// library built for another torch can crash instead of failing cleanly).
extern "C" __attribute__((used, visibility("default"))) const char tbf_cache_build_marker[] =
    "tinybert_fast_cache:torch=" TORCH_VERSION ";";

extern "C" {
// Importing tinybert_fast._teacher_cache loads this library, whose static initialisers register
// the ops below; the module itself is empty (the pytorch/extension-cpp pattern).
PyObject* PyInit__teacher_cache(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_teacher_cache", nullptr, -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}

namespace tbf_cache {
namespace {

// ---------------------------------------------------------------------------------------------
// CRC32C (Castagnoli polynomial 0x1EDC6F41, reflected 0x82F63B78): the SSE4.2 crc32 instruction
// where the CPU has it (about 8 bytes per 3 cycles), else slicing-by-8 tables.  Both give the
// standard CRC32C (check value of "123456789": 0xE3069283).

struct Crc32cTables {
  uint32_t t[8][256];
  Crc32cTables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
      t[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; ++i)
      for (int k = 1; k < 8; ++k) t[k][i] = (t[k - 1][i] >> 8) ^ t[0][t[k - 1][i] & 0xFFu];
  }
};

const Crc32cTables& crc_tables() {
  static const Crc32cTables tables;
  return tables;
}

uint32_t crc32c_software(uint32_t crc, const uint8_t* p, size_t n) {
  const auto& t = crc_tables().t;
  crc = ~crc;
  while (n && (reinterpret_cast<uintptr_t>(p) & 7u)) {
    crc = t[0][(crc ^ *p++) & 0xFFu] ^ (crc >> 8);
    --n;
  }
  while (n >= 8) {  // little-endian word order (x86, arm64)
    uint64_t w;
    std::memcpy(&w, p, 8);
    w ^= crc;
    crc = t[7][w & 0xFF] ^ t[6][(w >> 8) & 0xFF] ^ t[5][(w >> 16) & 0xFF] ^
          t[4][(w >> 24) & 0xFF] ^ t[3][(w >> 32) & 0xFF] ^ t[2][(w >> 40) & 0xFF] ^
          t[1][(w >> 48) & 0xFF] ^ t[0][w >> 56];
    p += 8;
    n -= 8;
  }
  while (n--) crc = t[0][(crc ^ *p++) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

#ifdef TBF_X86_CRC
__attribute__((target("sse4.2"))) uint32_t crc32c_sse42(uint32_t crc, const uint8_t* p,
                                                        size_t n) {
  uint64_t c = ~crc;
  while (n && (reinterpret_cast<uintptr_t>(p) & 7u)) {
    c = _mm_crc32_u8(static_cast<uint32_t>(c), *p++);
    --n;
  }
  while (n >= 8) {
    uint64_t w;
    std::memcpy(&w, p, 8);
    c = _mm_crc32_u64(c, w);
    p += 8;
    n -= 8;
  }
  while (n--) c = _mm_crc32_u8(static_cast<uint32_t>(c), *p++);
  return ~static_cast<uint32_t>(c);
}
#endif

using CrcFn = uint32_t (*)(uint32_t, const uint8_t*, size_t);

CrcFn pick_crc() {
#ifdef TBF_X86_CRC
  if (__builtin_cpu_supports("sse4.2")) return crc32c_sse42;
#endif
  return crc32c_software;
}

inline uint32_t crc32c(uint32_t crc, const uint8_t* p, size_t n) {
  static const CrcFn fn = pick_crc();
  return fn(crc, p, n);
}

// Checksums a record in the order it is read, so each byte is checked while it is hot in cache:
// advance(end) folds in the bytes up to `end` (record-relative) not yet folded in.
class CrcCursor {
 public:
  explicit CrcCursor(const uint8_t* base) : base_(base) {}
  void advance(int64_t end) {
    if (end > pos_) {
      crc_ = crc32c(crc_, base_ + pos_, static_cast<size_t>(end - pos_));
      pos_ = end;
    }
  }
  uint32_t value() const { return crc_; }

 private:
  const uint8_t* base_;
  int64_t pos_ = 0;
  uint32_t crc_ = 0;
};

// ---------------------------------------------------------------------------------------------
// A persistent thread pool: parallel_for(n, threads, fn) runs fn(0..n-1) on the calling thread
// plus up to threads-1 workers, with dynamic scheduling (ragged examples differ in cost by up to
// (512/1)^2).  One job at a time; callers from several Python threads queue.  After fork() the
// child starts a fresh pool: the parent's worker threads do not exist there.

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

void parallel_for(int64_t n, int64_t threads, const std::function<void(int64_t)>& fn) {
  if (threads <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  pool().run(n, static_cast<int>(std::min<int64_t>(threads - 1, n - 1)), fn);
}

// ---------------------------------------------------------------------------------------------
// Argument checks: messages name the argument, what was seen and what was expected.

Layout parse_layout(c10::IntArrayRef layout) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(layout.size()) == kLayoutInts,
                    "layout: expected ", kLayoutInts, " integers [num_logits, num_hidden, "
                    "hidden_size, num_attention, num_heads, storage, qk_head_dim, qk_min_length], "
                    "got ", layout.size());
  Layout l{layout[0], layout[1], layout[2], layout[3], layout[4], layout[5], layout[6],
           layout[7]};
  TORCH_CHECK_VALUE(l.num_logits >= 0 && l.num_hidden >= 0 && l.num_attention >= 0,
                    "layout: counts must be >= 0, got ", layout);
  TORCH_CHECK_VALUE(l.num_hidden == 0 || l.hidden_size > 0,
                    "layout: hidden_size must be > 0 when num_hidden > 0, got ", layout);
  TORCH_CHECK_VALUE(l.num_attention == 0 || l.num_heads > 0,
                    "layout: num_heads must be > 0 when num_attention > 0, got ", layout);
  TORCH_CHECK_VALUE(l.storage >= kFloat32 && l.storage <= kInt8,
                    "layout: storage code must be 0 (fp32), 1 (bf16), 2 (fp16) or 3 (int8), got ",
                    l.storage);
  TORCH_CHECK_VALUE(l.qk_head_dim >= 0 && (l.qk_head_dim == 0 || l.qk_min_length >= 1),
                    "layout: qk_head_dim must be >= 0, and qk_min_length >= 1 when it is > 0; "
                    "got ", layout);
  return l;
}

c10::ScalarType storage_scalar_type(int64_t storage) {
  switch (storage) {
    case kFloat32: return at::kFloat;
    case kBFloat16: return at::kBFloat16;
    case kFloat16: return at::kHalf;
    default: return at::kChar;
  }
}

void check_index_tensor(const at::Tensor& t, const char* name, int64_t B) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, ": expected a CPU tensor, got device ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, ": expected int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == B, name, ": expected shape [", B, "], got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous tensor");
}

void check_sources(const at::TensorList sources, bool cpu) {
  TORCH_CHECK_VALUE(!sources.empty(), "sources: expected at least one byte tensor");
  for (size_t i = 0; i < sources.size(); ++i) {
    const auto& s = sources[i];
    TORCH_CHECK_TYPE(s.scalar_type() == at::kByte, "sources[", i, "]: expected uint8, got ",
                     s.scalar_type());
    TORCH_CHECK_VALUE(s.dim() == 1 && s.is_contiguous(), "sources[", i,
                      "]: expected a contiguous 1-D byte tensor, got shape ", s.sizes());
    TORCH_CHECK_VALUE(s.device().is_cpu() == cpu, "sources[", i, "]: expected a ",
                      cpu ? "CPU" : "CUDA", " tensor, got device ", s.device());
  }
}

void check_out_dtype(const Layout& l, c10::ScalarType out_dtype) {
  TORCH_CHECK_TYPE(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
                   "out_dtype: expected float32, bfloat16 or float16, got ", out_dtype);
  TORCH_CHECK_TYPE(l.storage == kInt8 || out_dtype == storage_scalar_type(l.storage),
                   "out_dtype: records stored as ", storage_scalar_type(l.storage),
                   " unpack to that dtype, got ", out_dtype);
}

// ---------------------------------------------------------------------------------------------
// crc32c / record_bytes

int64_t crc32c_op(const at::Tensor& data, int64_t crc) {
  TORCH_CHECK_VALUE(data.device().is_cpu(), "data: expected a CPU tensor, got ", data.device());
  TORCH_CHECK_VALUE(data.is_contiguous(), "data: expected a contiguous tensor");
  TORCH_CHECK_VALUE(crc >= 0 && crc <= 0xFFFFFFFFLL, "crc: expected a uint32 value, got ", crc);
  const auto* p = static_cast<const uint8_t*>(data.data_ptr());
  const size_t n = static_cast<size_t>(data.numel()) * data.element_size();
  return static_cast<int64_t>(crc32c(static_cast<uint32_t>(crc), p, n));
}

at::Tensor record_bytes_op(const at::Tensor& lengths, c10::IntArrayRef layout) {
  const Layout l = parse_layout(layout);
  check_index_tensor(lengths, "lengths", lengths.numel());
  auto out = at::empty_like(lengths);
  const int64_t* len = lengths.data_ptr<int64_t>();
  int64_t* o = out.data_ptr<int64_t>();
  for (int64_t b = 0; b < lengths.numel(); ++b) {
    TORCH_CHECK_VALUE(len[b] >= 1, "lengths[", b, "]: expected >= 1, got ", len[b]);
    o[b] = sections(l, len[b]).bytes;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// pack: padded teacher outputs -> back-to-back records.

template <typename T>
void copy_row(uint8_t* dst, const T* src, int64_t n) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(T));
}

// 8-bit: q = rint(x / s), s = max|x| / 127 (the smallest positive float if that underflows).
void quantize_row(uint8_t* dst, float* scale_out, const float* src, int64_t n) {
  float amax = 0.0f;
  for (int64_t j = 0; j < n; ++j) amax = std::max(amax, std::fabs(src[j]));
  float scale = amax / kInt8Max;
  if (amax > 0.0f && scale == 0.0f) scale = FLT_TRUE_MIN;
  *scale_out = scale;
  auto* q = reinterpret_cast<int8_t*>(dst);
  if (scale == 0.0f) {
    std::memset(q, 0, static_cast<size_t>(n));
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    const float r = std::nearbyint(src[j] / scale);
    q[j] = static_cast<int8_t>(std::min(kInt8Max, std::max(-kInt8Max, r)));
  }
}

// One example's record.  `slot` is the example's position among the batch's examples that store
// scores (attention: [n_att, Bs, H, Lp, Lp]) or, when stores_qk, among those that store Q and K
// (qk: [2, n_att, Bq, H, Lp, d_h]); the other tensor is not read.
template <typename T>
void pack_example(uint8_t* rec, int64_t b, int64_t L, int64_t B, int64_t Lp, const Layout& l,
                  const T* logits, const T* hidden, const T* attention, const T* qk, int64_t slot,
                  int64_t n_slots) {
  const Sections sec = sections(l, L);
  const int64_t H = l.num_heads, d = l.hidden_size, C = l.num_logits;
  const bool q8 = l.storage == kInt8;
  auto* scales = reinterpret_cast<float*>(rec + sec.scales);
  auto put = [&](uint8_t* dst, int64_t row, const T* src, int64_t n) {
    if (q8) quantize_row(dst, &scales[row], reinterpret_cast<const float*>(src), n);
    else copy_row(dst, src, n);
  };
  if (C > 0) put(rec + sec.logits, 0, logits + b * C, C);
  const int64_t es = element_size(l.storage);
  for (int64_t s = 0; s < l.num_hidden; ++s)
    for (int64_t t = 0; t < L; ++t)
      put(rec + sec.hidden + (s * L + t) * d * es, hidden_row0(l) + s * L + t,
          hidden + ((s * B + b) * Lp + t) * d, d);
  const int64_t row0 = attention_row0(l, L);
  if (stores_qk(l, L)) {
    const int64_t dh = l.qk_head_dim, n_att = l.num_attention;
    for (int64_t w = 0; w < 2; ++w)
      for (int64_t a = 0; a < n_att; ++a)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t t = 0; t < L; ++t) {
            const int64_t r = ((w * n_att + a) * H + h) * L + t;  // record row
            put(rec + sec.attention + r * dh * es, row0 + r,
                qk + ((((w * n_att + a) * n_slots + slot) * H + h) * Lp + t) * dh, dh);
          }
    return;
  }
  for (int64_t a = 0; a < l.num_attention; ++a)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t i = 0; i < L; ++i)
        put(rec + sec.attention + ((a * H + h) * L + i) * L * es, row0 + (a * H + h) * L + i,
            attention + (((a * n_slots + slot) * H + h) * Lp + i) * Lp, L);
}

// Position of each example among those of the batch that store scores, or among those that store
// Q and K (stores_qk), in batch order; counts of both.
struct Slots {
  std::vector<int64_t> slot;
  int64_t scores = 0, qk = 0;
};

Slots example_slots(const Layout& l, const int64_t* len, int64_t B) {
  Slots s;
  s.slot.resize(static_cast<size_t>(B));
  for (int64_t b = 0; b < B; ++b) s.slot[b] = stores_qk(l, len[b]) ? s.qk++ : s.scores++;
  return s;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> pack_op(
    const at::Tensor& lengths, const c10::optional<at::Tensor>& logits,
    const c10::optional<at::Tensor>& hidden, const c10::optional<at::Tensor>& attention,
    const c10::optional<at::Tensor>& qk, c10::IntArrayRef layout, int64_t num_threads) {
  const Layout l = parse_layout(layout);
  const int64_t B = lengths.numel();
  check_index_tensor(lengths, "lengths", B);
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK_VALUE(len[b] >= 1, "lengths[", b, "]: expected >= 1, got ", len[b]);
  const Slots slots = example_slots(l, len, B);
  const auto want = l.storage == kInt8 ? at::kFloat : storage_scalar_type(l.storage);
  auto check_input = [&](const c10::optional<at::Tensor>& t, const char* name, bool needed,
                         int64_t dims, const char* why) -> at::Tensor {
    if (!needed) {
      TORCH_CHECK_VALUE(!t.has_value(), name, ": given, but ", why);
      return at::Tensor();
    }
    TORCH_CHECK_VALUE(t.has_value(), name, ": required (", why, "), got None");
    TORCH_CHECK_VALUE(t->device().is_cpu(), name, ": expected a CPU tensor, got ", t->device());
    TORCH_CHECK_TYPE(t->scalar_type() == want, name, ": expected ", want,
                     l.storage == kInt8 ? " (8-bit storage quantizes float32)" : "",
                     ", got ", t->scalar_type());
    TORCH_CHECK_VALUE(t->dim() == dims, name, ": expected ", dims, " dimensions, got shape ",
                      t->sizes());
    return t->contiguous();
  };
  const at::Tensor lg = check_input(logits, "logits", l.num_logits > 0, 2,
                                    "the layout stores logits");
  const at::Tensor hd = check_input(hidden, "hidden", l.num_hidden > 0, 4,
                                    "the layout stores hidden states");
  const at::Tensor at_ = check_input(attention, "attention", slots.scores > 0 && l.num_attention,
                                     5, "examples of the batch store scores");
  const at::Tensor qk_ = check_input(qk, "qk", slots.qk > 0, 6,
                                     "examples of the batch store Q and K");
  if (lg.defined())
    TORCH_CHECK_VALUE(lg.size(0) == B && lg.size(1) == l.num_logits, "logits: expected [", B,
                      ", ", l.num_logits, "], got ", lg.sizes());
  int64_t Lp = -1;
  auto same_padding = [&](const char* name, int64_t got) {
    TORCH_CHECK_VALUE(Lp < 0 || got == Lp, name, ": padded length ", got,
                      " differs from the other inputs' ", Lp);
    Lp = got;
  };
  if (hd.defined()) {
    TORCH_CHECK_VALUE(hd.size(0) == l.num_hidden && hd.size(1) == B && hd.size(3) == l.hidden_size,
                      "hidden: expected [", l.num_hidden, ", ", B, ", L, ", l.hidden_size,
                      "], got ", hd.sizes());
    same_padding("hidden", hd.size(2));
  }
  if (at_.defined()) {
    TORCH_CHECK_VALUE(at_.size(0) == l.num_attention && at_.size(1) == slots.scores &&
                          at_.size(2) == l.num_heads && at_.size(3) == at_.size(4),
                      "attention: expected [", l.num_attention, ", ", slots.scores,
                      " (the examples that store scores), ", l.num_heads, ", L, L], got ",
                      at_.sizes());
    same_padding("attention", at_.size(3));
  }
  if (qk_.defined()) {
    TORCH_CHECK_VALUE(qk_.size(0) == 2 && qk_.size(1) == l.num_attention &&
                          qk_.size(2) == slots.qk && qk_.size(3) == l.num_heads &&
                          qk_.size(5) == l.qk_head_dim,
                      "qk: expected [2, ", l.num_attention, ", ", slots.qk,
                      " (the examples that store Q and K), ", l.num_heads, ", L, ", l.qk_head_dim,
                      "], got ", qk_.sizes());
    same_padding("qk", qk_.size(4));
  }
  auto offsets = at::empty({B + 1}, lengths.options());
  int64_t* off = offsets.data_ptr<int64_t>();
  off[0] = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(Lp < 0 || len[b] <= Lp, "lengths[", b, "]: expected 1..", Lp,
                      " (the padded length), got ", len[b]);
    off[b + 1] = off[b] + sections(l, len[b]).bytes;
  }
  // Zeroed so that the gaps between sections are zero bytes: records are reproducible.
  auto records = at::zeros({off[B]}, lengths.options().dtype(at::kByte));
  auto crcs = at::empty({B}, lengths.options());
  uint8_t* base = records.data_ptr<uint8_t>();
  int64_t* crc = crcs.data_ptr<int64_t>();
  auto run = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    auto ptr = [](const at::Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
    const T *plg = ptr(lg), *phd = ptr(hd), *pat = ptr(at_), *pqk = ptr(qk_);
    parallel_for(B, num_threads, [&](int64_t b) {
      uint8_t* rec = base + off[b];
      const bool qk_b = stores_qk(l, len[b]);
      pack_example<T>(rec, b, len[b], B, Lp, l, plg, phd, pat, pqk, slots.slot[b],
                      qk_b ? slots.qk : slots.scores);
      crc[b] = crc32c(0, rec, static_cast<size_t>(off[b + 1] - off[b]));
    });
  };
  switch (l.storage) {
    case kFloat32:
    case kInt8: run(static_cast<float*>(nullptr)); break;
    case kBFloat16: run(static_cast<c10::BFloat16*>(nullptr)); break;
    default: run(static_cast<c10::Half*>(nullptr));
  }
  return {records, offsets, crcs};
}

// ---------------------------------------------------------------------------------------------
// gather: records -> staging buffer, checksummed on the way.

constexpr int64_t kCopyBlock = 16 << 10;  // checksum a block, then copy it while it is in L1

at::Tensor gather_op(at::TensorList sources, const at::Tensor& source_index,
                     const at::Tensor& offsets, const at::Tensor& nbytes,
                     const c10::optional<at::Tensor>& crcs, const at::Tensor& staging,
                     const at::Tensor& staging_offsets, int64_t num_threads) {
  check_sources(sources, /*cpu=*/true);
  const int64_t B = offsets.numel();
  check_index_tensor(source_index, "source_index", B);
  check_index_tensor(offsets, "offsets", B);
  check_index_tensor(nbytes, "nbytes", B);
  check_index_tensor(staging_offsets, "staging_offsets", B);
  if (crcs.has_value()) check_index_tensor(*crcs, "crcs", B);
  TORCH_CHECK_VALUE(staging.device().is_cpu() && staging.scalar_type() == at::kByte &&
                        staging.dim() == 1 && staging.is_contiguous(),
                    "staging: expected a contiguous 1-D uint8 CPU tensor, got ",
                    staging.scalar_type(), " ", staging.sizes(), " on ", staging.device());
  const int64_t* src_idx = source_index.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* n = nbytes.data_ptr<int64_t>();
  const int64_t* soff = staging_offsets.data_ptr<int64_t>();
  const int64_t* want = crcs.has_value() ? crcs->data_ptr<int64_t>() : nullptr;
  uint8_t* dst_base = staging.data_ptr<uint8_t>();
  const int64_t staging_size = staging.numel();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_INDEX(src_idx[b] >= 0 && src_idx[b] < static_cast<int64_t>(sources.size()),
                      "source_index[", b, "]: ", src_idx[b], " is not in [0, ", sources.size(),
                      ")");
    TORCH_CHECK_INDEX(off[b] >= 0 && n[b] >= 0 && off[b] + n[b] <= sources[src_idx[b]].numel(),
                      "offsets[", b, "]: record [", off[b], ", ", off[b] + n[b],
                      ") runs past the end of sources[", src_idx[b], "] (",
                      sources[src_idx[b]].numel(), " bytes)");
    TORCH_CHECK_INDEX(soff[b] >= 0 && soff[b] + n[b] <= staging_size, "staging_offsets[", b,
                      "]: [", soff[b], ", ", soff[b] + n[b], ") runs past the end of staging (",
                      staging_size, " bytes)");
  }
  auto bad = at::zeros({want ? B : 0}, offsets.options().dtype(at::kBool));
  bool* bad_p = want ? bad.data_ptr<bool>() : nullptr;
  std::vector<const uint8_t*> src_ptr(sources.size());
  for (size_t i = 0; i < sources.size(); ++i)
    src_ptr[i] = static_cast<const uint8_t*>(sources[i].data_ptr());
  parallel_for(B, num_threads, [&](int64_t b) {
    const uint8_t* src = src_ptr[src_idx[b]] + off[b];
    uint8_t* dst = dst_base + soff[b];
    uint32_t crc = 0;
    for (int64_t pos = 0; pos < n[b]; pos += kCopyBlock) {
      const size_t len = static_cast<size_t>(std::min(kCopyBlock, n[b] - pos));
      if (want) crc = crc32c(crc, src + pos, len);
      std::memcpy(dst + pos, src + pos, len);
    }
    if (want) bad_p[b] = static_cast<int64_t>(crc) != want[b];
  });
  return bad;
}

// ---------------------------------------------------------------------------------------------
// unpack (CPU): records -> padded outputs, every padded entry 0.

template <typename O>
struct Unpacker {
  const Layout l;
  int64_t B, P;
  O *att, *hid, *logit, *qk;  // att [n_att, Bs, H, P, P], qk [2, n_att, Bq, H, P, d_h]
  int64_t* mask;
  int64_t n_scores, n_qk;     // Bs, Bq

  // n stored values -> dst[0:n], zeros in dst[n:width].
  static void row(O* dst, const uint8_t* src, int64_t n, int64_t width, bool q8, float scale) {
    if (q8) {
      const auto* q = reinterpret_cast<const int8_t*>(src);
      for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<O>(static_cast<float>(q[j]) * scale);
    } else {
      std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(O));
    }
    std::fill(dst + n, dst + width, static_cast<O>(0.0f));
  }

  // Example b (at `slot` among the batch's score or Q/K examples) from its record.
  void example(const uint8_t* rec, int64_t b, int64_t L, int64_t slot, CrcCursor* crc) const {
    const Sections sec = sections(l, L);
    const bool q8 = l.storage == kInt8;
    const int64_t es = element_size(l.storage);
    const int64_t H = l.num_heads, d = l.hidden_size, C = l.num_logits;
    const auto* scales = reinterpret_cast<const float*>(rec + sec.scales);
    if (crc && q8) crc->advance(sec.scales + num_rows(l, L) * 4);
    auto scale = [&](int64_t r) { return q8 ? scales[r] : 1.0f; };
    // Output rows 0..rows_out-1 of `width` values: stored rows 0..L-1 of n values starting at
    // byte `start` (scale rows from `scale_row`), then zero rows.
    auto rows = [&](O* dst, int64_t rows_out, int64_t width, int64_t start, int64_t scale_row,
                    int64_t n) {
      for (int64_t t = 0; t < rows_out; ++t, dst += width) {
        if (t >= L) {
          std::fill(dst, dst + width, static_cast<O>(0.0f));
          continue;
        }
        const int64_t pos = start + t * n * es;
        if (crc) crc->advance(pos + n * es);
        row(dst, rec + pos, n, width, q8, scale(scale_row + t));
      }
    };
    if (C > 0) {
      if (crc) crc->advance(sec.logits + C * es);
      row(logit + b * C, rec + sec.logits, C, C, q8, scale(0));
    }
    for (int64_t s = 0; s < l.num_hidden; ++s)
      rows(hid + (s * B + b) * P * d, P, d, sec.hidden + s * L * d * es,
           hidden_row0(l) + s * L, d);
    const int64_t a0 = attention_row0(l, L);
    if (stores_qk(l, L)) {
      const int64_t dh = l.qk_head_dim, n_att = l.num_attention;
      for (int64_t w = 0; w < 2; ++w)
        for (int64_t a = 0; a < n_att; ++a)
          for (int64_t h = 0; h < H; ++h) {
            const int64_t r = ((w * n_att + a) * H + h) * L;  // first record row of this head
            rows(qk + (((w * n_att + a) * n_qk + slot) * H + h) * P * dh, P, dh,
                 sec.attention + r * dh * es, a0 + r, dh);
          }
    } else {
      for (int64_t a = 0; a < l.num_attention; ++a)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t r = (a * H + h) * L;
          rows(att + ((a * n_scores + slot) * H + h) * P * P, P, P, sec.attention + r * L * es,
               a0 + r, L);
        }
    }
    for (int64_t t = 0; t < P; ++t) mask[b * P + t] = t < L ? 1 : 0;
    if (crc) crc->advance(sec.bytes);
  }
};

// The batch positions of the examples that store scores and of those that store Q and K, in
// order: given (checked against the lengths) or computed.
std::vector<int64_t> check_examples(const c10::optional<at::Tensor>& given, const char* name,
                                    const Layout& l, const int64_t* len, int64_t B, bool qk) {
  std::vector<int64_t> want;
  for (int64_t b = 0; b < B; ++b)
    if (stores_qk(l, len[b]) == qk) want.push_back(b);
  if (given.has_value()) {
    check_index_tensor(*given, name, given->numel());
    const int64_t* g = given->data_ptr<int64_t>();
    bool same = given->numel() == static_cast<int64_t>(want.size());
    for (size_t i = 0; same && i < want.size(); ++i) same = g[i] == want[i];
    TORCH_CHECK_VALUE(same, name, ": expected the ", want.size(), " batch positions whose "
                      "examples store ", qk ? "Q and K" : "scores", " (by length, qk_min_length=",
                      l.qk_min_length, "), in order; got ", given->sizes(), " other positions");
  }
  return want;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> unpack_cpu(
    at::TensorList sources, const at::Tensor& source_index, const at::Tensor& offsets,
    const at::Tensor& lengths, const c10::optional<at::Tensor>& crcs, c10::IntArrayRef layout,
    int64_t pad_to, c10::ScalarType out_dtype, int64_t num_threads,
    const c10::optional<at::Tensor>& score_examples,
    const c10::optional<at::Tensor>& qk_examples) {
  const Layout l = parse_layout(layout);
  check_sources(sources, /*cpu=*/true);
  check_out_dtype(l, out_dtype);
  const int64_t B = lengths.numel();
  check_index_tensor(source_index, "source_index", B);
  check_index_tensor(offsets, "offsets", B);
  check_index_tensor(lengths, "lengths", B);
  if (crcs.has_value()) check_index_tensor(*crcs, "crcs", B);
  TORCH_CHECK_VALUE(pad_to >= 1, "pad_to: expected >= 1, got ", pad_to);
  const int64_t* src_idx = source_index.data_ptr<int64_t>();
  const int64_t* off = offsets.data_ptr<int64_t>();
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(len[b] >= 1 && len[b] <= pad_to, "lengths[", b, "]: expected 1..pad_to (",
                      pad_to, "), got ", len[b]);
    TORCH_CHECK_INDEX(src_idx[b] >= 0 && src_idx[b] < static_cast<int64_t>(sources.size()),
                      "source_index[", b, "]: ", src_idx[b], " is not in [0, ", sources.size(),
                      ")");
    const int64_t nb = sections(l, len[b]).bytes;
    TORCH_CHECK_INDEX(off[b] >= 0 && off[b] + nb <= sources[src_idx[b]].numel(), "offsets[", b,
                      "]: record [", off[b], ", ", off[b] + nb, ") runs past the end of sources[",
                      src_idx[b], "] (", sources[src_idx[b]].numel(), " bytes)");
  }
  const auto on_scores = check_examples(score_examples, "score_examples", l, len, B, false);
  const auto on_qk = check_examples(qk_examples, "qk_examples", l, len, B, true);
  const Slots slots = example_slots(l, len, B);
  const auto opts = lengths.options().dtype(out_dtype);
  const int64_t P = pad_to, H = l.num_heads, d = l.hidden_size;
  const int64_t n_att = l.num_attention, Bs = static_cast<int64_t>(on_scores.size()),
                Bq = static_cast<int64_t>(on_qk.size());
  auto att = at::empty({n_att, n_att ? Bs : 0, n_att ? H : 0, P, P}, opts);
  auto qk = at::empty({2, n_att, n_att ? Bq : 0, n_att ? H : 0, P, l.qk_head_dim}, opts);
  auto hid = at::empty({l.num_hidden, B, P, l.num_hidden ? d : 0}, opts);
  auto logit = at::empty({B, l.num_logits}, opts);
  auto mask = at::empty({B, P}, lengths.options());
  const int64_t* want = crcs.has_value() ? crcs->data_ptr<int64_t>() : nullptr;
  auto bad = at::zeros({want ? B : 0}, lengths.options().dtype(at::kBool));
  bool* bad_p = want ? bad.data_ptr<bool>() : nullptr;
  std::vector<const uint8_t*> src_ptr(sources.size());
  for (size_t i = 0; i < sources.size(); ++i)
    src_ptr[i] = static_cast<const uint8_t*>(sources[i].data_ptr());
  auto run = [&](auto* tag) {
    using O = std::remove_pointer_t<decltype(tag)>;
    const Unpacker<O> u{l, B, P, att.data_ptr<O>(), hid.data_ptr<O>(), logit.data_ptr<O>(),
                        qk.data_ptr<O>(), mask.data_ptr<int64_t>(), Bs, Bq};
    parallel_for(B, num_threads, [&](int64_t b) {
      const uint8_t* rec = src_ptr[src_idx[b]] + off[b];
      if (want) {
        CrcCursor crc(rec);
        u.example(rec, b, len[b], slots.slot[b], &crc);
        bad_p[b] = static_cast<int64_t>(crc.value()) != want[b];
      } else {
        u.example(rec, b, len[b], slots.slot[b], nullptr);
      }
    });
  };
  switch (out_dtype) {
    case at::kFloat: run(static_cast<float*>(nullptr)); break;
    case at::kBFloat16: run(static_cast<c10::BFloat16*>(nullptr)); break;
    default: run(static_cast<c10::Half*>(nullptr));
  }
  return {att, hid, logit, mask, bad, qk};
}

std::string build_info() {
  return std::string("torch ") + TORCH_VERSION + (
#ifdef TBF_WITH_CUDA
                                                     " cuda"
#else
                                                     " cpu-only"
#endif
                                                 );
}

}  // namespace
}  // namespace tbf_cache

TORCH_LIBRARY(tinybert_fast_cache, m) {
  m.def("build_info() -> str", &tbf_cache::build_info);
  m.def("crc32c(Tensor data, int crc=0) -> int");
  m.def("record_bytes(Tensor lengths, int[] layout) -> Tensor");
  m.def(
      "pack(Tensor lengths, Tensor? logits, Tensor? hidden, Tensor? attention, Tensor? qk, "
      "int[] layout, int num_threads=1) -> (Tensor records, Tensor offsets, Tensor crcs)");
  m.def(
      "gather(Tensor[] sources, Tensor source_index, Tensor offsets, Tensor nbytes, Tensor? crcs, "
      "Tensor(a!) staging, Tensor staging_offsets, int num_threads=1) -> Tensor bad");
  m.def(
      "unpack(Tensor[] sources, Tensor source_index, Tensor offsets, Tensor lengths, Tensor? crcs, "
      "int[] layout, int pad_to, ScalarType out_dtype, int num_threads=1, "
      "Tensor? score_examples=None, Tensor? qk_examples=None) -> (Tensor attention, "
      "Tensor hidden, Tensor logits, Tensor attention_mask, Tensor bad, Tensor qk)");
}

TORCH_LIBRARY_IMPL(tinybert_fast_cache, CPU, m) {
  m.impl("crc32c", &tbf_cache::crc32c_op);
  m.impl("record_bytes", &tbf_cache::record_bytes_op);
  m.impl("pack", &tbf_cache::pack_op);
  m.impl("gather", &tbf_cache::gather_op);
  m.impl("unpack", &tbf_cache::unpack_cpu);
}
