"""How many kernels a training-loop step launches: the loop's objective (distill.Objective, the
one the `distill` command runs) hands the mapped layers to the ops stacked, so each intermediate
term launches its kernel once whatever the number of layers (README "Kernel launches per step").

Counted under Triton's interpreter, where every launch of a @triton.jit kernel goes through
`InterpretedFunction.run`; the counts are per kernel name, forward and backward apart.
"""

from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import tinybert_fast as tbf
from conftest import count_launches, needs_triton
from tinybert_fast import capture
from tinybert_fast.distill.config import DistillConfig
from tinybert_fast.distill.objective import Objective, StudentWithProjection
from tinybert_fast.distill.targets import TeacherTargets
from tinybert_fast.mapping import layer_map

transformers = pytest.importorskip("transformers")

TEACHER_LAYERS, D_S, D_T, HEADS, B, L = 6, 16, 32, 2, 2, 8


def _bert(layers, width):
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=width, num_hidden_layers=layers,
                                  num_attention_heads=HEADS, intermediate_size=2 * width,
                                  max_position_embeddings=L, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0,
                                  attn_implementation=capture.register())
    return transformers.BertModel(cfg)


def _inputs():
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 5:] = 0
    return {"input_ids": torch.randint(0, 50, (B, L)), "attention_mask": mask,
            "token_type_ids": torch.zeros(B, L, dtype=torch.long)}


def _step_launches(n_student: int, attention_form: str, cached: bool):
    """(forward counts, backward counts) of one task-step-1 objective on a student of n layers."""
    teacher, student = _bert(TEACHER_LAYERS, D_T).eval(), _bert(n_student, D_S)
    cfg = DistillConfig(stage="task1", output_dir="-", student="-", task="sst2",
                        attention_form=attention_form)
    lm = layer_map("uniform" if TEACHER_LAYERS % n_student == 0 else "top", n_student,
                   TEACHER_LAYERS)
    objective = Objective(cfg, None, TeacherTargets.of(cfg, lm, teacher.config), teacher)
    model = StudentWithProjection(student, nn.Linear(D_S, D_T))
    inputs = _inputs()
    batch = None
    if cached:  # a TeacherBatch's shapes: stacked [n, B, ...] in teacher-layer order
        with torch.no_grad(), capture.record_scores(lm.teacher_attention_layers) as rec:
            out = teacher(**inputs, output_hidden_states=True)
        batch = types.SimpleNamespace(
            attention=torch.stack(rec.layers),
            hidden=torch.stack([out.hidden_states[i] for i in lm.teacher_hidden_states]))
    with count_launches() as forward:
        terms = objective(model, inputs, None, batch)
    with count_launches() as backward:
        terms["total"].backward()
    assert set(terms) == {"attention", "embedding", "hidden", "total"}
    return dict(forward), dict(backward)


@needs_triton
@pytest.mark.parametrize("cached", [False, True], ids=["live-teacher", "teacher-cache"])
def test_score_path_launches_once_per_term(cached):
    tbf.set_backend("triton")
    for n_student in (1, 3):
        forward, backward = _step_launches(n_student, "scores", cached)
        # attention: one fused kernel for all layers; embedding and hidden: one GEMM kernel each
        assert forward.get("_attention_mse_fwd_kernel") == 1, (n_student, forward)
        assert forward.get("_hidden_mse_fwd_kernel") == 2, (n_student, forward)
        # its gradient is written by the forward kernel; backward scales it in place (one launch,
        # which reads grad_output on the device and, at 1, nothing else)
        assert "_attention_mse_bwd_kernel" not in backward
        assert backward.get("_scale_in_place_kernel") == 1, (n_student, backward)
        assert "_hidden_mse_fwd_kernel" not in backward  # its backward is cuBLAS products


@needs_triton
def test_qk_path_launches_once_per_term():
    tbf.set_backend("triton")
    for n_student in (1, 3):
        forward, backward = _step_launches(n_student, "qk", False)
        # L = 8 < AUTO_GRAM_MIN_L: the tiled kernels; backward one launch for dQ, one for dK
        assert forward == {"_tiled_fwd_kernel": 1, "_hidden_mse_fwd_kernel": 2}, forward
        assert backward == {"_tiled_bwd_kernel": 2}, backward
