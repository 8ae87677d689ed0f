// The teacher-activation cache's one definition of the record layout and of the argument checks,
// shared by the CPU path (teacher_cache.cpp: schemas, pack, gather, unpack) and the CUDA kernels
// (cuda/teacher_cache_kernel.cu), so both read records the same way and refuse the same inputs.
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

#include <ATen/ATen.h>

#include <cstdint>

#if defined(__CUDACC__)
#define TBF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TBF_HOST_DEVICE inline
#endif

// The `int[] layout` argument of the ops: these integers in this order.  The one place the order
// is written: Layout below, parse_layout, kLayoutInts and the layout_fields op (whose answer
// the loader checks against tinybert_fast/cache/_fields.py's LAYOUT_FIELDS when the extension
// loads) all expand this list.
#define TBF_LAYOUT_FIELDS(X)                                                              \
  X(num_logits)    /* C; 0 = no logits stored */                                          \
  X(num_hidden)    /* mapped hidden states per example */                                 \
  X(hidden_size)   /* d */                                                                \
  X(num_attention) /* mapped attention layers per example */                              \
  X(num_heads)     /* H */                                                                \
  X(storage)       /* Storage code */                                                     \
  X(qk_head_dim)   /* d_h of the stored Q and K; 0 = every example stores scores */       \
  X(qk_min_length) /* examples with L >= this store Q and K (when qk_head_dim > 0) */

namespace tbf_cache {

// Storage codes, as in the Python layer (tinybert_fast/cache/format.py: STORAGE).
enum Storage : int64_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kInt8 = 3 };

constexpr int64_t kAlign = 16;
// 8-bit storage: q = rint(x / scale) with scale = max|row| / kInt8Max, so |x - q*scale| <= scale/2.
constexpr float kInt8Max = 127.0f;

struct Layout {
#define TBF_DECLARE_FIELD(name) int64_t name;
  TBF_LAYOUT_FIELDS(TBF_DECLARE_FIELD)
#undef TBF_DECLARE_FIELD
};

#define TBF_COUNT_FIELD(name) +1
constexpr int64_t kLayoutInts = 0 TBF_LAYOUT_FIELDS(TBF_COUNT_FIELD);
#undef TBF_COUNT_FIELD

// "num_logits, num_hidden, ...": what the layout_fields op returns.
#define TBF_NAME_FIELD(name) ", " #name
constexpr const char kLayoutFieldNames[] = TBF_LAYOUT_FIELDS(TBF_NAME_FIELD);
#undef TBF_NAME_FIELD
inline const char* layout_field_names() { return kLayoutFieldNames + 2; }  // past the first ", "

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

// ---------------------------------------------------------------------------------------------
// Argument checks (host code), used by the CPU and the CUDA kernels alike: messages name the
// argument, what was seen and what was expected.

inline Layout parse_layout(c10::IntArrayRef layout) {
  TORCH_CHECK_VALUE(static_cast<int64_t>(layout.size()) == kLayoutInts, "layout: expected ",
                    kLayoutInts, " integers [", layout_field_names(), "], got ", layout.size());
  Layout l;
  int64_t i = 0;
#define TBF_READ_FIELD(name) l.name = layout[i++];
  TBF_LAYOUT_FIELDS(TBF_READ_FIELD)
#undef TBF_READ_FIELD
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

inline c10::ScalarType storage_scalar_type(int64_t storage) {
  switch (storage) {
    case kFloat32: return at::kFloat;
    case kBFloat16: return at::kBFloat16;
    case kFloat16: return at::kHalf;
    default: return at::kChar;
  }
}

// A contiguous int64 [B] tensor on `device` (offsets, lengths, batch positions, ...).
inline void check_index_tensor(const at::Tensor& t, const char* name, int64_t B,
                               const c10::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, name, ": expected a tensor on ", device, ", got ",
                    t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kLong, name, ": expected int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == B, name, ": expected shape [", B, "], got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.is_contiguous(), name, ": expected a contiguous tensor");
}

inline void check_index_tensor(const at::Tensor& t, const char* name, int64_t B) {
  check_index_tensor(t, name, B, c10::Device(c10::kCPU));
}

// Contiguous 1-D uint8 tensors, all of device type `type`.
inline void check_sources(const at::TensorList sources, c10::DeviceType type) {
  TORCH_CHECK_VALUE(!sources.empty(), "sources: expected at least one byte tensor");
  for (size_t i = 0; i < sources.size(); ++i) {
    const auto& s = sources[i];
    TORCH_CHECK_TYPE(s.scalar_type() == at::kByte, "sources[", i, "]: expected uint8, got ",
                     s.scalar_type());
    TORCH_CHECK_VALUE(s.dim() == 1 && s.is_contiguous(), "sources[", i,
                      "]: expected a contiguous 1-D byte tensor, got shape ", s.sizes());
    TORCH_CHECK_VALUE(s.device().type() == type, "sources[", i, "]: expected a ",
                      c10::DeviceTypeName(type), " tensor, got device ", s.device());
  }
}

inline void check_out_dtype(const Layout& l, c10::ScalarType out_dtype) {
  TORCH_CHECK_TYPE(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
                   "out_dtype: expected float32, bfloat16 or float16, got ", out_dtype);
  TORCH_CHECK_TYPE(l.storage == kInt8 || out_dtype == storage_scalar_type(l.storage),
                   "out_dtype: records stored as ", storage_scalar_type(l.storage),
                   " unpack to that dtype, got ", out_dtype);
}

// The checks both kernels of unpack make on their common arguments; the layout.  `device`: where
// the index tensors must be (the CPU, or the CUDA device holding the staged records).
inline Layout check_unpack_args(at::TensorList sources, const at::Tensor& source_index,
                                const at::Tensor& offsets, const at::Tensor& lengths,
                                const c10::optional<at::Tensor>& crcs, c10::IntArrayRef layout,
                                int64_t pad_to, c10::ScalarType out_dtype,
                                const c10::Device& device) {
  const Layout l = parse_layout(layout);
  check_sources(sources, device.type());
  check_out_dtype(l, out_dtype);
  const int64_t B = lengths.numel();
  check_index_tensor(source_index, "source_index", B, device);
  check_index_tensor(offsets, "offsets", B, device);
  check_index_tensor(lengths, "lengths", B, device);
  if (crcs.has_value()) check_index_tensor(*crcs, "crcs", B, device);
  TORCH_CHECK_VALUE(pad_to >= 1, "pad_to: expected >= 1, got ", pad_to);
  return l;
}

}  // namespace tbf_cache
