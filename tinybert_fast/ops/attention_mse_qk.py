"""Attention-score MSE from Q and K, without the score maps: public function -> registered ops
`tinybert_fast::attention_mse_qk(_backward)` -> kernels `tinybert_fast.kernels.attention_mse_qk`.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _checks, reference
from ..kernels import attention_mse_qk as kernels
from ._qk import empty_grads, first_layer, qk_inputs, register_qk_autograd

METHODS = ("auto", "gram", "tiled")
# "auto" takes the Gram form from this length on.  Per head the tiled path costs ~L^2 (d_s+d_t)
# multiply-adds per pass (tensor cores for 16-bit inputs), the Gram form ~L (d_s+d_t)^2 (its
# backward in fp32): at d_s + d_t ~ 90 they meet around L ~ 256-512.  Chosen from flop counts, to
# be tuned on a GPU.  Decided from shapes only: choosing by values would need a host sync.
AUTO_GRAM_MIN_L = 512


def attention_mse_qk(q_s, k_s, q_t, k_t, attention_mask: Tensor | None = None,
                     reduction: str = "mean", method: str = "auto") -> Tensor:
    """TinyBERT's attention loss from the queries and keys, summed over layers (fp32 scalar).

    Equal to `attention_mse(Q_s K_s^T/sqrt(d_s) + bias, Q_t K_t^T/sqrt(d_t) + bias, mask)` with
    bias = -10000 on padded keys, without forming the [B, H, L, L] scores: the models can run SDPA
    / flash attention and hand over Q and K.

    Args:
        q_s, k_s: student queries and keys, one layer [B, H, L, d_s], stacked layers
            [n_layers, B, H, L, d_s], or a list/tuple of [B, H, L, d_s] (one per mapped layer).
        q_t, k_t: the teacher's, the same with d_t (d_s != d_t is fine, e.g. 26 vs 64; B, H and
            L must match: heads are paired one to one).  float16 / bfloat16 / float32, any
            strides, dtypes may differ between tensors; d_s, d_t <= 128 on the fused path.
        attention_mask: optional [B, L], 1 (or True) = token, 0 = padding.  Padded keys
            contribute 0 (as if their rows of K_s and K_t were 0) but count in the denominator;
            padded query rows are not masked (TinyBERT semantics).
        reduction: "mean" (TinyBERT) or "sum".
        method: "gram" | "tiled" | "auto" (fused path only; the eager reference forms the scores):
            "gram":  O(L*d^2) work, O(d^2) memory per head: ||S_s - S_t||_F^2 =
                     <X^T X, Y^T M Y> with X = [Q_s/sqrt(d_s) | Q_t/sqrt(d_t)], Y = [K_s | -K_t].
            "tiled": O(L^2*d) work, O(L*d) memory: score-difference tiles in registers
                     (flash-attention style), forward and backward.
            "auto":  "tiled" for L < 512, "gram" from L = 512 on (by shape, never by value).

    With S_s = Q_s K_s^T/sqrt(d_s), S_t = Q_t K_t^T/sqrt(d_t) and key mask m[b, j]:
        "mean": sum_layers (1 / (B*H*L*L)) * sum_{b,h,i,j} m[b,j] * (S_s - S_t)_{bhij}^2
        "sum":  sum_layers sum_{b,h,i,j} m[b,j] * (S_s - S_t)^2
    This differs from the score path only where an unmasked score is itself <= -100 (the score
    path zeroes it, this op does not); real scores essentially never get there.

    Accuracy: both methods accumulate in fp32.  When student ~ teacher the Gram form's three traces
    cancel: its loss's relative error grows like eps_fp32 * (||S|| / ||S_s - S_t||)^2; the tiled
    path keeps the error of the scores themselves, like the score path.  Measured against float64
    (fp32 inputs, B=2 H=4 L=128, d 26 vs 64, one sequence 25% padded, the teacher = the student's
    scores + r-sized noise, r = ||S_s - S_t|| / ||S_t||; `python -m benchmarks.bench_attention_qk
    --accuracy`), relative errors:

        r        loss: gram   tiled    score(fp32) | dQ_s: gram  tiled   score(fp32)
        0.61           1.1e-7  0        0           |       7.4e-7  3.3e-7  3.6e-7
        7.7e-2         1.4e-5  8.9e-8   0           |       7.1e-6  2.8e-6  2.8e-6
        7.7e-3         1.4e-3  2.1e-7   2.1e-7      |       7.1e-5  2.8e-5  2.8e-5
        7.7e-4         1.4e-1  3.2e-7   1.1e-7      |       7.1e-4  2.8e-4  2.8e-4
        7.7e-5         1.4e+1  1.8e-5   1.7e-5      |       7.1e-3  2.8e-3  2.8e-3

    (dK_s alike.)  So "gram" is accurate to 1e-5 while the scores differ by >= 10% (relative
    Frobenius norm) and to 1e-4 down to 3%, with gradients ~2.5x the score path's error at any r;
    "tiled" matches the score path computed in fp32 all the way down.  A student within a few
    percent of its teacher's scores should use "tiled" (or "auto" at L < 512).

    Gradients flow to whichever of the four inputs require them (teacher gradients are supported:
    the loss is symmetric).  Fused path, stacked inputs: gram forward 3 launches (Q Grams, K
    Grams, one fp64 inner product per head), backward 2; tiled forward 1 + a partial-sum reduction,
    backward 2 (dQ, dK).  Saved for backward: the inputs, plus for "gram" the two (d_s+d_t)^2 fp32
    Grams per head.  No host synchronisation.
    """
    _checks.check_reduction(reduction, "attention")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if not _backend.use_fused(first_layer(q_s)):
        return reference.attention_mse_qk(q_s, k_s, q_t, k_t, attention_mask, reduction)
    _, groups, (B, H, L, _, _) = qk_inputs(q_s, k_s, q_t, k_t, attention_mask)
    scale = 1.0 / (B * H * L * L) if reduction == "mean" else 1.0
    loss, _ = torch.ops.tinybert_fast.attention_mse_qk(*groups, attention_mask, scale,
                                                       resolve_method(method, L))
    return loss


def resolve_method(method: str, L: int) -> str:
    """The method ("gram" or "tiled") that `method` runs at sequence length L."""
    if method == "auto":
        return "gram" if L >= AUTO_GRAM_MIN_L else "tiled"
    return method


# --- registered ops ------------------------------------------------------------------------------
# Groups are [n, B, H, L, d] tensors (one stacked tensor, or one per layer); `scale` folds in the
# reduction; `method` is "gram" or "tiled".  Outputs: the loss and, for "gram", the Grams
# [2, N, d_s+d_t, d_s+d_t] fp32 (G_Q, G_K for the N = sum(n)*B*H heads) that backward reuses;
# [2, 0, D, D] for "tiled".  The default kernel launches Triton; the CPU kernel computes the same
# in PyTorch unless backend "triton" runs the kernels in Triton's interpreter.

def _check_method(method: str) -> None:
    if method not in ("gram", "tiled"):
        raise ValueError(f"method must be 'gram' or 'tiled'; got {method!r}")


@torch.library.custom_op("tinybert_fast::attention_mse_qk", mutates_args=())
def _attention_mse_qk_op(q_s: list[Tensor], k_s: list[Tensor], q_t: list[Tensor],
                         k_t: list[Tensor], attention_mask: Optional[Tensor], scale: float,
                         method: str) -> tuple[Tensor, Tensor]:
    return _triton_forward(q_s, k_s, q_t, k_t, attention_mask, scale, method)


def _no_grams(q_s: list[Tensor], q_t: list[Tensor]) -> Tensor:
    D = q_s[0].shape[-1] + q_t[0].shape[-1]
    return q_s[0].new_empty((2, 0, D, D), dtype=torch.float32)


@_attention_mse_qk_op.register_fake
def _(q_s, k_s, q_t, k_t, attention_mask, scale, method):
    _, B, H, L, d_s = q_s[0].shape
    D = d_s + q_t[0].shape[-1]
    N = sum(x.shape[0] for x in q_s) * B * H if method == "gram" else 0
    return (q_s[0].new_empty((), dtype=torch.float32),
            q_s[0].new_empty((2, N, D, D), dtype=torch.float32))


def _torch_xy(q_s, k_s, q_t, k_t, attention_mask):
    """X = [a_s Q_s | a_t Q_t] and Y = M [K_s | -K_t], fp32 [N, L, D] over all groups."""
    a_s, a_t = q_s[0].shape[-1] ** -0.5, q_t[0].shape[-1] ** -0.5
    L = q_s[0].shape[-2]
    xs, ys = [], []
    for qs, ks, qt, kt in zip(q_s, k_s, q_t, k_t):
        y = torch.cat([ks.float(), -kt.float()], -1)
        if attention_mask is not None:
            y = y * (attention_mask != 0)[None, :, None, :, None]
        xs.append(torch.cat([qs.float() * a_s, qt.float() * a_t], -1).reshape(-1, L, y.shape[-1]))
        ys.append(y.reshape(-1, L, y.shape[-1]))
    return torch.cat(xs), torch.cat(ys)


@_attention_mse_qk_op.register_kernel("cpu")
def _(q_s, k_s, q_t, k_t, attention_mask, scale, method):
    _check_method(method)
    if _backend.cpu_kernel_runs_triton():
        return _triton_forward(q_s, k_s, q_t, k_t, attention_mask, scale, method)
    x, y = _torch_xy(q_s, k_s, q_t, k_t, attention_mask)
    if method == "tiled":
        return (x @ y.transpose(1, 2)).square().sum() * scale, _no_grams(q_s, q_t)
    grams = torch.stack([x.transpose(1, 2) @ x, y.transpose(1, 2) @ y])
    loss = (grams[0].double() * grams[1].double()).sum() * scale
    return loss.float(), grams


def _triton_forward(q_s, k_s, q_t, k_t, attention_mask, scale, method):
    _check_method(method)
    if method == "gram":
        return kernels.gram_forward(q_s, k_s, q_t, k_t, attention_mask, scale)
    return (kernels.tiled_forward(q_s, k_s, q_t, k_t, attention_mask, scale),
            _no_grams(q_s, q_t))


@torch.library.custom_op("tinybert_fast::attention_mse_qk_backward", mutates_args=())
def _attention_mse_qk_backward_op(
        grad: Tensor, grams: Tensor, q_s: list[Tensor], k_s: list[Tensor], q_t: list[Tensor],
        k_t: list[Tensor], attention_mask: Optional[Tensor], scale: float, method: str,
        need_q_s: bool, need_k_s: bool, need_q_t: bool, need_k_t: bool
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]:
    return _triton_backward(grad, grams, q_s, k_s, q_t, k_t, attention_mask, scale, method,
                            (need_q_s, need_k_s, need_q_t, need_k_t))


def _triton_backward(grad, grams, q_s, k_s, q_t, k_t, attention_mask, scale, method, need):
    _check_method(method)
    if method == "gram":
        out = kernels.gram_backward(grad, grams, q_s, k_s, q_t, k_t, attention_mask, scale, need)
    else:
        out = kernels.tiled_backward(grad, q_s, k_s, q_t, k_t, attention_mask, scale, need)
    return tuple(out)


@_attention_mse_qk_backward_op.register_fake
def _(grad, grams, q_s, k_s, q_t, k_t, attention_mask, scale, method, need_q_s, need_k_s,
      need_q_t, need_k_t):
    return empty_grads((q_s, k_s, q_t, k_t), (need_q_s, need_k_s, need_q_t, need_k_t))


@_attention_mse_qk_backward_op.register_kernel("cpu")
def _(grad, grams, q_s, k_s, q_t, k_t, attention_mask, scale, method, need_q_s, need_k_s,
      need_q_t, need_k_t):
    need = (need_q_s, need_k_s, need_q_t, need_k_t)
    if _backend.cpu_kernel_runs_triton():
        return _triton_backward(grad, grams, q_s, k_s, q_t, k_t, attention_mask, scale, method,
                                need)
    _check_method(method)
    x, y = _torch_xy(q_s, k_s, q_t, k_t, attention_mask)
    coef = 2.0 * scale * grad.float()
    if method == "gram":
        dx, dy = x @ grams[1] * coef, y @ grams[0] * coef
    else:
        d = x @ y.transpose(1, 2)
        dx, dy = d @ y * coef, d.transpose(1, 2) @ x * coef
    d_s = q_s[0].shape[-1]
    a_s, a_t = d_s ** -0.5, q_t[0].shape[-1] ** -0.5
    parts = (dx[..., :d_s] * a_s, dy[..., :d_s], dx[..., d_s:] * a_t, -dy[..., d_s:])
    out = []
    for part, xs, needed in zip(parts, (q_s, k_s, q_t, k_t), need):
        grads = []
        if needed:
            for chunk, x_ in zip(part.split([x_.shape[0] * x_.shape[1] * x_.shape[2]
                                             for x_ in xs]), xs):
                # a fresh tensor each: custom ops may not return aliases of each other
                grads.append(torch.empty(x_.shape, dtype=x_.dtype).copy_(chunk.reshape(x_.shape)))
        out.append(grads)
    return tuple(out)


register_qk_autograd(_attention_mse_qk_op, _attention_mse_qk_backward_op)
