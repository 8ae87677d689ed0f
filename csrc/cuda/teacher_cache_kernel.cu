// Teacher-activation cache, GPU path: unpack records that were staged on the device (copied from
// a pinned buffer by cudaMemcpyAsync on a side stream) into padded outputs, dequantizing 8-bit
// storage, with every padded entry 0.  Registered as the CUDA kernel of
// tinybert_fast_cache::unpack (schema and CPU kernel in ../teacher_cache.cpp).
//
// One warp per output row (an attention row of P scores, a Q or K row of d_h values, a hidden
// row of d values, a logits row of C values): the lanes read a contiguous stored row and write a
// contiguous output row, so loads and stores coalesce; the row -> (example, section)
// decomposition is done once per row.  Scores go to [n_att, Bs, H, P, P] for the Bs examples
// stored as scores, Q and K to [2, n_att, Bq, H, P, d_h] for the Bq stored as Q and K (the host
// passes both lists of batch positions; tinybert_fast/cache/reader.py forms the scores Q K^T
// from them).
// Checksums are verified on the host while gathering (gather), before the copy.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../teacher_cache.h"

namespace tbf_cache {
namespace {

enum Kind { kAttentionRows = 0, kHiddenRows = 1, kLogitRows = 2, kQKRows = 3 };

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

template <typename O, bool kQ8, int kKind>
__global__ void unpack_rows_kernel(const uint8_t* __restrict__ records,
                                   const int64_t* __restrict__ offsets,
                                   const int64_t* __restrict__ lengths,
                                   const int64_t* __restrict__ examples, Layout l, int64_t B,
                                   int64_t n_examples, int64_t P, int64_t rows,
                                   O* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); row < rows;
       row += stride) {
    int64_t b, width, n, elem0, srow, section;
    if (kKind == kAttentionRows) {  // out [n_att, Bs, H, P, P]: row = ((a*Bs + k)*H + h)*P + i
      const int64_t H = l.num_heads;
      const int64_t i = row % P;
      int64_t r = row / P;
      const int64_t h = r % H;
      r /= H;
      const int64_t k = r % n_examples;
      b = examples != nullptr ? examples[k] : k;
      const int64_t a = r / n_examples;
      const int64_t L = lengths[b];
      width = P;
      n = i < L ? L : 0;
      elem0 = ((a * H + h) * L + i) * L;
      srow = attention_row0(l, L) + (a * H + h) * L + i;
      section = sections(l, L).attention;
    } else if (kKind == kQKRows) {  // out [2, n_att, Bq, H, P, d_h]: ((wa*Bq + k)*H + h)*P + t
      const int64_t H = l.num_heads;
      const int64_t t = row % P;
      int64_t r = row / P;
      const int64_t h = r % H;
      r /= H;
      b = examples[r % n_examples];
      const int64_t wa = r / n_examples;  // w * n_att + a
      const int64_t L = lengths[b];
      width = l.qk_head_dim;
      n = t < L ? width : 0;
      const int64_t rec_row = (wa * H + h) * L + t;
      elem0 = rec_row * width;
      srow = attention_row0(l, L) + rec_row;
      section = sections(l, L).attention;
    } else if (kKind == kHiddenRows) {  // out [n_hid, B, P, d]: row = (s*B + b)*P + t
      const int64_t t = row % P;
      const int64_t r = row / P;
      b = r % B;
      const int64_t s = r / B;
      const int64_t L = lengths[b];
      width = l.hidden_size;
      n = t < L ? width : 0;
      elem0 = (s * L + t) * width;
      srow = hidden_row0(l) + s * L + t;
      section = sections(l, L).hidden;
    } else {  // out [B, C]: row = b
      b = row;
      width = l.num_logits;
      n = width;
      elem0 = 0;
      srow = 0;
      section = sections(l, lengths[b]).logits;
    }
    const uint8_t* rec = records + offsets[b];
    O* dst = out + row * width;
    if (kQ8) {
      const float scale = n > 0 ? reinterpret_cast<const float*>(rec)[srow] : 0.0f;
      const int8_t* q = reinterpret_cast<const int8_t*>(rec + section) + elem0;
      for (int64_t j = lane; j < width; j += 32)
        dst[j] = j < n ? static_cast<O>(static_cast<float>(q[j]) * scale) : static_cast<O>(0.0f);
    } else {
      const O* src = reinterpret_cast<const O*>(rec + section) + elem0;
      for (int64_t j = lane; j < width; j += 32) dst[j] = j < n ? src[j] : static_cast<O>(0.0f);
    }
  }
}

__global__ void mask_kernel(const int64_t* __restrict__ lengths, int64_t total, int64_t P,
                            int64_t* __restrict__ mask) {
  for (int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; k < total;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x)
    mask[k] = (k % P) < lengths[k / P] ? 1 : 0;
}

int blocks_for(int64_t work, int64_t per_block) {
  const int64_t want = (work + per_block - 1) / per_block;
  return static_cast<int>(std::min<int64_t>(std::max<int64_t>(want, 1), 1 << 20));
}

// The batch positions of the examples a kind of output holds (nullptr: all of them, in order).
struct Examples {
  const int64_t* index;
  int64_t count;
};

template <typename O, bool kQ8, int kKind>
void launch_rows(const at::Tensor& records, const at::Tensor& offsets, const at::Tensor& lengths,
                 Examples ex, const Layout& l, int64_t B, int64_t P, at::Tensor& out,
                 int64_t rows, cudaStream_t stream) {
  if (rows == 0 || out.numel() == 0) return;
  unpack_rows_kernel<O, kQ8, kKind><<<blocks_for(rows, kWarps), kThreads, 0, stream>>>(
      records.data_ptr<uint8_t>(), offsets.data_ptr<int64_t>(), lengths.data_ptr<int64_t>(),
      ex.index, l, B, ex.count, P, rows, out.data_ptr<O>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename O, bool kQ8>
void launch_all(const at::Tensor& records, const at::Tensor& offsets, const at::Tensor& lengths,
                Examples on_scores, Examples on_qk, const Layout& l, int64_t B, int64_t P,
                at::Tensor& att, at::Tensor& qk, at::Tensor& hid, at::Tensor& logit,
                cudaStream_t stream) {
  const Examples all{nullptr, B};
  launch_rows<O, kQ8, kAttentionRows>(records, offsets, lengths, on_scores, l, B, P, att,
                                      l.num_attention * on_scores.count * l.num_heads * P,
                                      stream);
  launch_rows<O, kQ8, kQKRows>(records, offsets, lengths, on_qk, l, B, P, qk,
                               2 * l.num_attention * on_qk.count * l.num_heads * P, stream);
  launch_rows<O, kQ8, kHiddenRows>(records, offsets, lengths, all, l, B, P, hid,
                                   l.num_hidden * B * P, stream);
  launch_rows<O, kQ8, kLogitRows>(records, offsets, lengths, all, l, B, P, logit,
                                  l.num_logits > 0 ? B : 0, stream);
}

// CUDA kernel of tinybert_fast_cache::unpack.  sources: exactly one uint8 CUDA tensor holding
// the staged records (source_index is not read: every record is in sources[0]); offsets and
// lengths: int64 [B] on the same device, each offset a multiple of 16; crcs must be None (the
// host verified the records in gather).  score_examples / qk_examples: int64 on the device, the
// batch positions of the examples stored as scores / as Q and K (required when the layout stores
// Q and K; None otherwise means every example stores scores).  Lengths and positions are not
// checked on the device: the host that staged them computed them.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> unpack_cuda(
    at::TensorList sources, const at::Tensor& source_index, const at::Tensor& offsets,
    const at::Tensor& lengths, const c10::optional<at::Tensor>& crcs, c10::IntArrayRef layout,
    int64_t pad_to, c10::ScalarType out_dtype, int64_t num_threads,
    const c10::optional<at::Tensor>& score_examples,
    const c10::optional<at::Tensor>& qk_examples) {
  (void)num_threads;
  TORCH_CHECK_VALUE(sources.size() == 1, "sources: the CUDA kernel takes the staged records as "
                    "one tensor, got ", sources.size());
  const at::Tensor& records = sources[0];
  TORCH_CHECK_VALUE(records.is_cuda(), "sources[0]: expected a CUDA tensor, got device ",
                    records.device());
  // The checks of the CPU kernel (teacher_cache.h), with the index tensors on records' device.
  const Layout l = check_unpack_args(sources, source_index, offsets, lengths, crcs, layout, pad_to,
                                     out_dtype, records.device());
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(records.data_ptr()) % kAlign == 0,
                    "sources[0]: expected a 16-byte aligned buffer");
  TORCH_CHECK_VALUE(!crcs.has_value(), "crcs: the CUDA kernel does not verify checksums (gather "
                    "verifies them on the host); pass None");
  const int64_t B = lengths.numel();
  const bool with_qk = l.num_attention > 0 && l.qk_head_dim > 0;
  TORCH_CHECK_VALUE(!with_qk || (score_examples.has_value() && qk_examples.has_value()),
                    "score_examples, qk_examples: required when the layout stores Q and K "
                    "(qk_head_dim > 0)");
  Examples on_scores{nullptr, B}, on_qk{nullptr, 0};
  if (score_examples.has_value()) {
    check_index_tensor(*score_examples, "score_examples", score_examples->numel(),
                       records.device());
    on_scores = {score_examples->data_ptr<int64_t>(), score_examples->numel()};
  }
  if (qk_examples.has_value()) {
    TORCH_CHECK_VALUE(with_qk || qk_examples->numel() == 0, "qk_examples: the layout stores no Q "
                      "and K, got ", qk_examples->numel(), " positions");
    check_index_tensor(*qk_examples, "qk_examples", qk_examples->numel(), records.device());
    on_qk = {qk_examples->data_ptr<int64_t>(), qk_examples->numel()};
  }
  TORCH_CHECK_VALUE(on_scores.count + on_qk.count == B, "score_examples, qk_examples: expected ",
                    B, " positions in all, got ", on_scores.count, " + ", on_qk.count);

  const c10::cuda::CUDAGuard guard(records.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const auto opts = lengths.options().dtype(out_dtype);
  const int64_t P = pad_to, n_att = l.num_attention, H = n_att ? l.num_heads : 0;
  auto att = at::empty({n_att, n_att ? on_scores.count : 0, H, P, P}, opts);
  auto qk = at::empty({2, n_att, n_att ? on_qk.count : 0, H, P, l.qk_head_dim}, opts);
  auto hid = at::empty({l.num_hidden, B, P, l.num_hidden ? l.hidden_size : 0}, opts);
  auto logit = at::empty({B, l.num_logits}, opts);
  auto mask = at::empty({B, P}, lengths.options());
  auto bad = at::empty({0}, lengths.options().dtype(at::kBool));
  const bool q8 = l.storage == kInt8;
#define TBF_LAUNCH(O, Q8) \
  launch_all<O, Q8>(records, offsets, lengths, on_scores, on_qk, l, B, P, att, qk, hid, logit, \
                    stream)
  switch (out_dtype) {
    case at::kFloat:
      if (q8) TBF_LAUNCH(float, true);
      else TBF_LAUNCH(float, false);
      break;
    case at::kBFloat16:
      if (q8) TBF_LAUNCH(c10::BFloat16, true);
      else TBF_LAUNCH(c10::BFloat16, false);
      break;
    default:
      if (q8) TBF_LAUNCH(c10::Half, true);
      else TBF_LAUNCH(c10::Half, false);
  }
#undef TBF_LAUNCH
  if (B * P > 0) {
    mask_kernel<<<blocks_for(B * P, kThreads), kThreads, 0, stream>>>(
        lengths.data_ptr<int64_t>(), B * P, P, mask.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {att, hid, logit, mask, bad, qk};
}

}  // namespace
}  // namespace tbf_cache

TORCH_LIBRARY_IMPL(tinybert_fast_cache, CUDA, m) {
  m.impl("unpack", &tbf_cache::unpack_cuda);
}
