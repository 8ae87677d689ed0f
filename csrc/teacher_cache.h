// Record layout of the teacher-activation cache, shared by the CPU path (teacher_cache.cpp) and
// the CUDA kernels (cuda/teacher_cache_kernel.cu): one definition of where every value lives.
//
// One record per example of length L (its real tokens; nothing padded is stored), in this order,
// each section starting at a multiple of 16 bytes (zero bytes in between, so records are
// reproducible byte for byte and their checksums are stable):
//
//   scales     fp32 [rows]              8-bit storage only: one scale per stored row, in row order
//   logits     S    [C]                 row 0 when C > 0
//   hidden     S    [n_hid, L, d]       token-major rows: state s, token t -> row
//   attention  S    [n_att, H, L, L]    an L x L block per (layer, head): row i = query token i
//        or    S    [2, n_att, H, L, d_h]  the queries, then the keys, of each layer and head
//                                       (token-major rows of d_h), when the layout stores Q and K
//                                       for an example of this length (stores_qk): 2*L*d_h
//                                       values per head instead of L*L, smaller once L > 2*d_h;
//                                       the scores are then Q K^T / sqrt(d_h) (BERT's scaling)
//
// S is the storage type: fp32, bf16, fp16, or int8 with x = q * scale[row].  Rows are numbered
// logits first (if any), then hidden (s, t), then attention (layer, h, i), or for Q and K
// (w, layer, h, t) with w = 0 for Q and 1 for K.  A record's size is a multiple of 16, so records
// laid back to back stay aligned.  Whether an example stores scores or Q and K follows from its
// length alone (Layout::qk_min_length), so the index needs no per-example flag.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define TBF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TBF_HOST_DEVICE inline
#endif

namespace tbf_cache {

// Storage codes, as in the Python layer (tinybert_fast/cache.py: _STORAGE).
enum Storage : int64_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kInt8 = 3 };

constexpr int64_t kAlign = 16;
// 8-bit storage: q = rint(x / scale) with scale = max|row| / kInt8Max, so |x - q*scale| <= scale/2.
constexpr float kInt8Max = 127.0f;

struct Layout {
  int64_t num_logits;     // C; 0 = no logits stored
  int64_t num_hidden;     // mapped hidden states per example
  int64_t hidden_size;    // d
  int64_t num_attention;  // mapped attention layers per example
  int64_t num_heads;      // H
  int64_t storage;        // Storage
  int64_t qk_head_dim;    // d_h of the stored Q and K; 0 = every example stores scores
  int64_t qk_min_length;  // examples with L >= this store Q and K (when qk_head_dim > 0)
};

constexpr int64_t kLayoutInts = 8;  // the `int[] layout` argument of the ops, in field order

// Byte offsets of the sections inside one record, and the record's size.
struct Sections {
  int64_t scales, logits, hidden, attention, bytes;
};

TBF_HOST_DEVICE int64_t align_up(int64_t x) { return (x + kAlign - 1) / kAlign * kAlign; }

TBF_HOST_DEVICE int64_t element_size(int64_t storage) {
  return storage == kFloat32 ? 4 : (storage == kInt8 ? 1 : 2);
}

// Does an example of length L store Q and K (rather than its L x L scores)?
TBF_HOST_DEVICE bool stores_qk(const Layout& l, int64_t L) {
  return l.num_attention > 0 && l.qk_head_dim > 0 && L >= l.qk_min_length;
}

// Values of the attention section, and its rows (8-bit scales), for an example of length L.
TBF_HOST_DEVICE int64_t attention_values(const Layout& l, int64_t L) {
  return stores_qk(l, L) ? 2 * l.num_attention * l.num_heads * L * l.qk_head_dim
                         : l.num_attention * l.num_heads * L * L;
}
TBF_HOST_DEVICE int64_t attention_rows(const Layout& l, int64_t L) {
  return (stores_qk(l, L) ? 2 : 1) * l.num_attention * l.num_heads * L;
}

// First scale row of each section (8-bit storage).
TBF_HOST_DEVICE int64_t hidden_row0(const Layout& l) { return l.num_logits > 0 ? 1 : 0; }
TBF_HOST_DEVICE int64_t attention_row0(const Layout& l, int64_t L) {
  return hidden_row0(l) + l.num_hidden * L;
}
TBF_HOST_DEVICE int64_t num_rows(const Layout& l, int64_t L) {
  return attention_row0(l, L) + attention_rows(l, L);
}

TBF_HOST_DEVICE Sections sections(const Layout& l, int64_t L) {
  const int64_t es = element_size(l.storage);
  Sections s;
  int64_t off = 0;
  s.scales = off;
  if (l.storage == kInt8) off += align_up(num_rows(l, L) * 4);
  s.logits = off;
  off += align_up(l.num_logits * es);
  s.hidden = off;
  off += align_up(l.num_hidden * L * l.hidden_size * es);
  s.attention = off;
  off += align_up(attention_values(l, L) * es);
  s.bytes = off;
  return s;
}

}  // namespace tbf_cache
