"""Argument checks and input normalisation shared by the public losses.

Every error a user can cause names the argument, what was seen and what was expected.  Nothing here
reads tensor values (no host synchronisation): only shapes, dtypes and devices.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REDUCTIONS = {"attention": ("mean", "sum"), "hidden": ("mean", "sum"),
              "soft_ce": ("mean", "batchmean", "sum")}


def check_reduction(reduction: str, family: str) -> None:
    allowed = REDUCTIONS[family]
    if reduction not in allowed:
        raise ValueError(f"reduction must be one of {allowed}; got {reduction!r}")


def check_float(name: str, t: torch.Tensor, fused: bool) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got dtype {t.dtype}")
    if fused and t.dtype not in FUSED_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; the fused kernels take float16, bfloat16 or "
                        f"float32 (tinybert_fast.reference computes in any float dtype)")


def check_same_device(**tensors: torch.Tensor | None) -> None:
    items = [(k, v) for k, v in tensors.items() if v is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             f"all inputs must be on one device")


def _as_list(name: str, x, what: str) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, Sequence) and not isinstance(x, (str, bytes)):
        if len(x) == 0:
            raise ValueError(f"{name} is an empty sequence; expected one {what} tensor per mapped "
                             f"layer")
        for i, xi in enumerate(x):
            if not isinstance(xi, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor; got {type(xi).__name__}")
        return list(x)
    raise TypeError(f"{name} must be a tensor or a list/tuple of tensors; got {type(x).__name__}")


def layers_4d(name: str, x, dims: str = "[B, H, L, L]"
              ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Normalise per-layer 4-D tensors (attention scores [B, H, L, L], or Q/K [B, H, L, d]) given
    as one layer, stacked layers [n_layers, ...] or a list/tuple of layers.

    Returns (layers, stacked): the layers (views, no copies), and x as [n_layers, ...] when x was
    one tensor (4-D or 5-D), else None.
    """
    layers = _as_list(name, x, dims)
    if isinstance(x, torch.Tensor):
        if x.dim() == 5:
            return list(x.unbind(0)), x
        if x.dim() != 4:
            raise ValueError(f"{name} must be {dims} or stacked [n_layers, {dims[1:]}; got "
                             f"shape {tuple(x.shape)}")
        return layers, x.unsqueeze(0)
    for i, xi in enumerate(layers):
        if xi.dim() != 4:
            raise ValueError(f"{name}[{i}] must be {dims}; got shape {tuple(xi.shape)}")
    return layers, None


def attention_layers(name: str, x) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Attention scores [B, H, L, L] per layer: see layers_4d."""
    return layers_4d(name, x, "[B, H, L, L]")


def check_attention(student: list[torch.Tensor], teacher: list[torch.Tensor],
                    attention_mask: torch.Tensor | None, fused: bool) -> None:
    if len(student) != len(teacher):
        raise ValueError(f"student has {len(student)} layers but teacher has {len(teacher)}; "
                         f"pass one teacher layer per student layer (see tinybert_fast.mapping)")
    shape = student[0].shape
    for who, layers in (("student", student), ("teacher", teacher)):
        for i, t in enumerate(layers):
            check_float(f"{who}[{i}]" if len(layers) > 1 else who, t, fused)
            if t.shape != shape:
                raise ValueError(f"{who} layer {i} has shape {tuple(t.shape)} but student layer 0 "
                                 f"has {tuple(shape)}; every layer must be [B, H, L, L] alike "
                                 f"(attention heads are paired one to one)")
    B, H, L, L2 = shape
    if L != L2:
        raise ValueError(f"attention scores must be square in the last two dims [B, H, L, L]; got "
                         f"shape {tuple(shape)}")
    if B * H * L == 0:
        raise ValueError(f"attention scores are empty: shape {tuple(shape)}")
    if attention_mask is not None:
        check_mask(attention_mask, B, L)
    check_same_device(student=student[0], teacher=teacher[0], attention_mask=attention_mask,
                      **{f"student[{i}]": t for i, t in enumerate(student[1:], 1)},
                      **{f"teacher[{i}]": t for i, t in enumerate(teacher[1:], 1)})


def check_mask(attention_mask: torch.Tensor, B: int, L: int) -> None:
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor [B, L]; got "
                        f"{type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (B, L):
        raise ValueError(f"attention_mask must be [B, L] = [{B}, {L}] (1 = token, 0 = padding); "
                         f"got shape {tuple(attention_mask.shape)}")
    if attention_mask.is_complex():
        raise TypeError(f"attention_mask must be bool, integer or float; got {attention_mask.dtype}")


def hidden_states(name: str, x) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """Normalise hidden states to a list of [M, d] tensors (M = tokens per state).

    A tensor of rank 2 or 3 ([M, d] or [B, L, d]) is one state; rank 4 is stacked states
    [n_states, B, L, d]; a list/tuple holds one [..., d] tensor per state.
    Returns (states, stacked): `stacked` is x as [n_states, M, d] when x was one tensor, else None.
    (reshape copies only inputs whose strides cannot be merged; autograd sees the copy.)
    """
    states = _as_list(name, x, "[..., d]")
    if isinstance(x, torch.Tensor):
        if x.dim() not in (2, 3, 4):
            raise ValueError(f"{name} must be one state [M, d] or [B, L, d], or stacked states "
                             f"[n_states, B, L, d]; got shape {tuple(x.shape)}")
        n = x.shape[0] if x.dim() == 4 else 1
        stacked = x.reshape(n, -1, x.shape[-1])
        return list(stacked.unbind(0)), stacked
    out = []
    for i, s in enumerate(states):
        if s.dim() < 2:
            raise ValueError(f"{name}[{i}] must be [..., d] with at least 2 dims; got shape "
                             f"{tuple(s.shape)}")
        out.append(s.reshape(-1, s.shape[-1]))
    return out, None


def check_hidden(student: list[torch.Tensor], teacher: list[torch.Tensor], weight: torch.Tensor,
                 bias: torch.Tensor | None, fused: bool) -> None:
    if len(student) != len(teacher):
        raise ValueError(f"student has {len(student)} states but teacher has {len(teacher)}; "
                         f"pass one teacher state per student state")
    check_float("weight", weight, fused)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [d_t, d_s] (the nn.Linear layout); got shape "
                         f"{tuple(weight.shape)}")
    d_t, d_s = weight.shape
    if bias is not None:
        check_float("bias", bias, fused)
        if tuple(bias.shape) != (d_t,):
            raise ValueError(f"bias must be [d_t] = [{d_t}] to match weight {tuple(weight.shape)}; "
                             f"got shape {tuple(bias.shape)}")
    M = student[0].shape[0]
    for i, (s, t) in enumerate(zip(student, teacher)):
        check_float(f"student[{i}]" if len(student) > 1 else "student", s, fused)
        check_float(f"teacher[{i}]" if len(teacher) > 1 else "teacher", t, fused)
        if s.shape[1] != d_s:
            raise ValueError(f"student state {i} has d_s = {s.shape[1]} but weight is "
                             f"[d_t, d_s] = {tuple(weight.shape)}")
        if t.shape[1] != d_t:
            raise ValueError(f"teacher state {i} has d_t = {t.shape[1]} but weight is "
                             f"[d_t, d_s] = {tuple(weight.shape)}")
        if s.shape[0] != M or t.shape[0] != M:
            raise ValueError(f"state {i} has {s.shape[0]} student and {t.shape[0]} teacher tokens; "
                             f"every state must hold the same {M} tokens")
    if M == 0:
        raise ValueError("hidden states are empty (0 tokens)")
    check_same_device(student=student[0], teacher=teacher[0], weight=weight, bias=bias,
                      **{f"student[{i}]": t for i, t in enumerate(student[1:], 1)},
                      **{f"teacher[{i}]": t for i, t in enumerate(teacher[1:], 1)})


def token_mask(mask, state: torch.Tensor) -> torch.Tensor | None:
    """A hidden-state token mask ([B, L] or [M], 1 = token) as [M], M = state's token count."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"token_mask must be a tensor [B, L] or [M]; got {type(mask).__name__}")
    if mask.numel() != state.shape[0]:
        raise ValueError(f"token_mask has shape {tuple(mask.shape)} ({mask.numel()} tokens) but "
                         f"each state holds {state.shape[0]} tokens; pass the [B, L] attention "
                         f"mask of the batch")
    if mask.device != state.device:
        raise ValueError(f"token_mask is on {mask.device} but student is on {state.device}")
    return mask.reshape(-1)


def logits_2d(student: torch.Tensor, teacher: torch.Tensor, fused: bool
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Check [..., C] logits and view them as [N, C]."""
    check_float("student_logits", student, fused)
    check_float("teacher_logits", teacher, fused)
    if student.shape != teacher.shape:
        raise ValueError(f"student_logits {tuple(student.shape)} and teacher_logits "
                         f"{tuple(teacher.shape)} must have the same shape [..., C]")
    if student.dim() == 0 or student.numel() == 0:
        raise ValueError(f"logits must be a non-empty [..., C] tensor; got shape "
                         f"{tuple(student.shape)}")
    check_same_device(student_logits=student, teacher_logits=teacher)
    C = student.shape[-1]
    return student.reshape(-1, C), teacher.reshape(-1, C)


def check_temperature(temperature: float) -> float:
    if isinstance(temperature, torch.Tensor) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python float; got {type(temperature).__name__}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    return float(temperature)


def logits_arguments(student_logits, temperature: float, reduction: str) -> float:
    """The checks of the losses on logits (soft_cross_entropy, kl_divergence): the reduction, the
    temperature (returned as a float) and that the student logits are a tensor."""
    check_reduction(reduction, "soft_ce")
    temperature = check_temperature(temperature)
    if not isinstance(student_logits, torch.Tensor):
        raise TypeError(f"student_logits must be a torch.Tensor; got "
                        f"{type(student_logits).__name__}")
    return temperature


def logits_scale(z: torch.Tensor, reduction: str) -> float:
    """The reduction of a loss on [N, C] logits as a factor: "mean" 1/(N*C), "batchmean" 1/N,
    "sum" 1."""
    N, C = z.shape
    return {"mean": 1.0 / (N * C), "batchmean": 1.0 / N, "sum": 1.0}[reduction]


def launch_groups(s_layers: list[torch.Tensor], s_stacked: torch.Tensor | None,
                  t_layers: list[torch.Tensor], t_stacked: torch.Tensor | None):
    """The groups [n, ...] an op launches its kernel on: the two stacked tensors when both sides
    came stacked with the same count (one launch for all layers), else one [1, ...] group per
    layer (lists)."""
    if s_stacked is not None and t_stacked is not None and s_stacked.shape[0] == t_stacked.shape[0]:
        return [s_stacked], [t_stacked]
    return [x.unsqueeze(0) for x in s_layers], [x.unsqueeze(0) for x in t_layers]
