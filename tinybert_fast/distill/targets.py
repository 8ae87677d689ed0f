"""What a run needs from the teacher, and in which form: decided once, read everywhere.

`TeacherTargets.of(cfg, layer_map, teacher_config)` turns a resolved DistillConfig, its layer map
and the teacher's encoder family into one frozen description, which the objective (what to record
or fetch), the teacher cache (what to store, and how), the loop, the Trainer integration and the
pair checks read instead of re-deriving it from config strings.

Terms: the *attention form* is how the attention loss gets the teacher's attention: "scores"
(pre-softmax scores [n, B, H, L, L], position bias included for MPNet) or "qk" (queries and keys
[n, B, H, L, d] each; attention_mse_qk).  `None` when the run has no attention term.
"""

from __future__ import annotations

import dataclasses

from .. import capture, mapping
from .config import DistillConfig, is_intermediate


@dataclasses.dataclass(frozen=True)
class TeacherTargets:
    """The teacher outputs a stage's objective reads, and the student's matching side.

    stage: the resolved stage (general | task1 | task2 | finetune).
    attention_form: "scores" | "qk" | None (no attention term in this stage).
    attention_layers: the teacher layers whose attention is read (0-based, each once, in the
        order the record and the cache keep them); attention_groups: per student layer, the
        teacher layers its target is the mean of (one each under the usual mappings).
    hidden_states: the teacher hidden states read (0 = the embeddings' output); hidden_groups:
        per student state (embeddings first), the teacher states its target is the mean of.
    logits: the teacher's logits are read: by the prediction term (task step 2), and in step 1
        by the loss balance "initial" (its reference, the prediction loss on the first batch).
    position_bias: the teacher's scores carry a position bias shared by its layers (MPNet): it
        is in every recorded and cached score map, and the Q/K form is refused.
    student_layers: the student layers whose attention is recorded (0-based).
    """
    stage: str
    attention_form: str | None = None
    attention_layers: tuple[int, ...] = ()
    attention_groups: tuple[tuple[int, ...], ...] = ()
    hidden_states: tuple[int, ...] = ()
    hidden_groups: tuple[tuple[int, ...], ...] = ()
    logits: bool = False
    position_bias: bool = False
    student_layers: tuple[int, ...] = ()

    @classmethod
    def of(cls, cfg: DistillConfig, layer_map: mapping.LayerMap | None,
           teacher_config=None) -> "TeacherTargets":
        """The targets of a resolved config's stage with its layer map (None outside the
        intermediate stages) and the teacher's config (its family; None: a BERT-like teacher).
        ValueError for a combination that cannot be computed: the Q/K form with averaged
        teacher layers or with a position-bias family."""
        bias = teacher_config is not None and capture.family(teacher_config,
                                                             "teacher").position_bias
        if not is_intermediate(cfg.stage):
            return cls(stage=cfg.stage, logits=cfg.stage == "task2" and cfg.prediction_weight != 0,
                       position_bias=bias)
        if layer_map is None:
            raise ValueError(f"stage {cfg.stage!r} needs a layer map")
        attention = cfg.attention_loss != "none" and cfg.attention_weight != 0
        hidden = cfg.hidden_loss != "none" and (cfg.hidden_weight != 0 or
                                                cfg.embedding_weight != 0)
        form = cfg.attention_form if attention else None
        if form == "qk" and bias:
            raise ValueError(f"--attention-form qk: {capture.MPNET_QK_ERROR}")
        if form == "qk" and any(len(g) > 1 for g in layer_map.attention):
            raise ValueError(f"mapping {cfg.mapping!r} averages teacher score maps, which "
                             f"attention_form 'qk' does not form; use --attention-form scores "
                             f"with it")
        return cls(
            stage=cfg.stage, attention_form=form, position_bias=bias,
            logits=cfg.stage == "task1" and cfg.loss_balance == "initial",
            attention_layers=tuple(layer_map.teacher_attention_layers) if attention else (),
            attention_groups=tuple(map(tuple, layer_map.attention)) if attention else (),
            hidden_states=tuple(layer_map.teacher_hidden_states) if hidden else (),
            hidden_groups=tuple(map(tuple, layer_map.hidden)) if hidden else (),
            student_layers=tuple(range(len(layer_map.attention))) if attention else ())

    @property
    def intermediate(self) -> bool:
        """The stage's loss is on intermediate layers (general distillation, task step 1)."""
        return is_intermediate(self.stage)

    @property
    def attention(self) -> bool:
        return self.attention_form is not None

    @property
    def hidden(self) -> bool:
        return bool(self.hidden_states)

    @property
    def cache_attention_storage(self) -> str:
        """How the teacher cache stores the attention: "qk" when the loss takes Q and K; "scores"
        when the teacher's scores carry a position bias (Q and K alone would lose it); else
        "auto" (Q and K where they are smaller than the scores, fetched as scores)."""
        if self.attention_form == "qk":
            return "qk"
        return "scores" if self.position_bias else "auto"
