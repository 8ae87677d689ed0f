// Teacher-activation cache: op schemas and the CPU path.
//
// Ops (namespace tinybert_fast_cache; Python wrapper: tinybert_fast/cache/):
//   crc32c(data, crc)            CRC32C (Castagnoli) of a byte tensor, continuing from `crc`
//   record_bytes(lengths, layout)  the size in bytes of the record of each example length
//   pack(...)                    padded teacher outputs -> unpadded records (+ offsets, CRCs)
//   gather(...)                  records from mapped files -> a (pinned) staging buffer, verified
//   unpack(...)                  records -> padded tensors + attention mask (CPU here; CUDA in
//                                cuda/teacher_cache_kernel.cu)
//   layout_fields()              the names of the `int[] layout` integers, in order
// The record layout and the argument checks (shared with the CUDA kernel) are in teacher_cache.h,
// CRC32C in crc32c.cpp; work over the examples of a batch runs on the thread pool of
// thread_pool.cpp.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "crc32c.h"
#include "teacher_cache.h"
#include "thread_pool.h"

// What this library was compiled against, readable without loading it: a loader can check it
// before loading, because PyTorch's C++ ABI changes between minor releases (loading a
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
  check_sources(sources, c10::kCPU);
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
  const Layout l = check_unpack_args(sources, source_index, offsets, lengths, crcs, layout, pad_to,
                                     out_dtype, c10::Device(c10::kCPU));
  const int64_t B = lengths.numel();
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

std::string layout_fields() { return layout_field_names(); }

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
  // The fake (meta) kernels are Python (tinybert_fast/cache/fake.py, registered when the cache
  // loads this library); torch.compile's error for a missing one names that module.
  m.set_python_module("tinybert_fast.cache.fake");
  m.def("build_info() -> str", &tbf_cache::build_info);
  m.def("layout_fields() -> str", &tbf_cache::layout_fields);
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
