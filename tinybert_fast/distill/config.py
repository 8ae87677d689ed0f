"""A distillation run's settings: the stages, their defaults, the student presets and the run's
configuration (`DistillConfig`), plus what `--help` prints of them.  No torch here: the command
line builds its parser from these names alone."""

from __future__ import annotations

import dataclasses
import warnings

from .. import glue

STAGES = ("general", "task1", "task2", "finetune")
INTERMEDIATE_STAGES = ("general", "task1")   # attention + hidden losses; no prediction head


def is_intermediate(stage: str) -> bool:
    """Whether a stage distils intermediate layers (general distillation, task step 1)."""
    return stage in INTERMEDIATE_STAGES

STAGE_DEFAULTS = {
    "general": dict(epochs=3, batch_size=256, lr=5e-5, warmup_ratio=0.1, schedule="linear"),
    "task1": dict(epochs=20, batch_size=32, lr=5e-5, warmup_ratio=0.0, schedule="constant"),
    "task2": dict(epochs=3, batch_size=32, lr=3e-5, warmup_ratio=0.1, schedule="linear"),
    "finetune": dict(epochs=3, batch_size=32, lr=2e-5, warmup_ratio=0.1, schedule="linear"),
}
TASK1_EPOCHS = {"mnli": 10, "qqp": 10, "qnli": 10, "cola": 50}

# Student architectures by name (vocabulary and position sizes come from the teacher).
PRESETS = {
    "tinybert4": dict(num_hidden_layers=4, hidden_size=312, num_attention_heads=12,
                      intermediate_size=1200),
    "tinybert6": dict(num_hidden_layers=6, hidden_size=768, num_attention_heads=12,
                      intermediate_size=3072),
}
# a preset student's family: the teacher's (MPNet teacher -> MPNet student, sharing its
# tokenizer, vocabulary and position scheme) or BERT on the teacher's vocabulary
STUDENT_FAMILIES = ("teacher", "bert")
PROJECTION_FILE = "projection.pt"
TRAINING_FILE = "tinybert_fast.json"   # in an exported model: {"stage", "task", "head_trained"}
# in a run folder whose head was trained: {split: {"predictions": [the last evaluation's
# prediction of each dev example, in the dev file's order], "labels": [their labels]}} (class
# indices; scores on a regression task)
PREDICTIONS_FILE = "predictions.json"


def head_trained(cfg: "DistillConfig", task) -> bool:
    """Whether a stage trains the prediction head: task step 2 (with a prediction or hard-label
    loss) and fine-tuning do; general distillation and task step 1 train the encoder only."""
    return cfg.stage == "finetune" or (cfg.stage == "task2" and (
        cfg.prediction_weight != 0 or cfg.hard_label_weight != 0))


def default_max_length(task: str | None) -> int:
    """--max-length when none is given: 64 tokens for a single-sentence task, 128 for sentence
    pairs (and without a task, general distillation's corpus)."""
    single = task is not None and len(glue.get_task(task).text_columns) == 1
    return 64 if single else 128


# the loss variants (tinybert_fast.distillation_terms); the first of each is TinyBERT's
LOSS_CHOICES = {"attention_loss": ("mse", "kl", "none"), "hidden_loss": ("mse", "cosine", "none"),
                "prediction_loss": ("soft_ce", "kl", "mse")}
# how the intermediate terms' weights are set: as given, or "initial": each term's weight times
# P0 / T0 (T0: the term on the first training batch, P0: the prediction loss of the student's
# logits against the teacher's on that batch), so that every term starts at the prediction loss's
# size; measured once, kept in the checkpoint (distill.objective.Objective.loss_scales)
LOSS_BALANCES = ("none", "initial")


@dataclasses.dataclass
class DistillConfig:
    """Everything a run needs; None means "the stage's default" (STAGE_DEFAULTS)."""
    stage: str
    output_dir: str
    student: str                       # preset name, checkpoint dir, or config.json
    student_family: str = "teacher"    # a preset's family: teacher (the teacher's) | bert
    teacher: str | None = None         # checkpoint dir or hub name (all stages but finetune)
    task: str | None = None            # GLUE task (all stages but general)
    data_dir: str | None = None        # local GLUE TSV folder; None -> `datasets`
    train_file: str | None = None      # e.g. an augmented train.tsv
    corpus: str | None = None          # general distillation text, one passage per line
    tokenizer: str | None = None       # default: the teacher's, else the student's
    init: str = "auto"                 # auto | random | teacher-layers
    mapping: str = "uniform"
    mapping_layers: list[int] | None = None
    mapping_seed: int = 0
    attention_weight: float = 1.0
    hidden_weight: float = 1.0
    embedding_weight: float = 1.0
    prediction_weight: float = 1.0
    hard_label_weight: float = 0.0
    temperature: float = 1.0
    attention_loss: str = "mse"        # mse (TinyBERT) | kl (MiniLM's distribution KL) | none
    hidden_loss: str = "mse"           # mse (TinyBERT) | cosine | none
    prediction_loss: str = "soft_ce"   # soft_ce (TinyBERT) | kl (Hinton, T^2) | mse (logits)
    loss_balance: str = "none"         # none | initial (LOSS_BALANCES; task step 1)
    losses: str = "fused"              # fused | eager (= tbf.set_backend("torch") for the run)
    teacher_cache: str | None = None   # teacher outputs cached here (built on first use)
    cache_dtype: str = "bf16"          # fp32 | bf16 | fp16 | int8
    rebuild_cache: bool = False        # remove the teacher cache and build it afresh
    mask_padding: bool = False         # exclude padded positions from the intermediate losses
    attention_form: str = "scores"     # scores | qk (attention_mse_qk: both models run SDPA)
    epochs: float | None = None
    batch_size: int | None = None
    lr: float | None = None
    task2_epochs: float | None = None  # stage "all": step 2's epochs and lr (default: epochs,
    task2_lr: float | None = None      # lr, as step 1's; else the task2 stage defaults)
    warmup_ratio: float | None = None
    schedule: str | None = None
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_steps: int | None = None
    max_length: int | None = None
    pad_to_max_length: bool = False
    group_by_length: bool = False      # batches of similar lengths (data.batch_indices)
    seed: int = 42
    device: str = "auto"
    bf16: str = "auto"                 # auto (on CUDA) | on | off
    save_steps: int = 500
    log_steps: int = 50
    eval_batch_size: int = 128
    eval: bool = True
    resume: bool = False
    keep_checkpoint: bool = False      # keep <output>/checkpoint after a finished run
    limit_train: int | None = None
    limit_eval: int | None = None
    progress: bool = True
    # deprecated (0.1.0's name of attention_form; removed in the next release)
    attention_from: dataclasses.InitVar[str | None] = None

    def __post_init__(self, attention_from: str | None) -> None:
        if attention_from is not None:
            warnings.warn("DistillConfig(attention_from=...) is deprecated: use attention_form",
                          DeprecationWarning, stacklevel=3)
            self.attention_form = attention_from

    def resolved(self) -> "DistillConfig":
        """A copy with the stage defaults filled in; validates choices."""
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES + ('all',)}; got {self.stage!r}")
        if self.losses not in ("fused", "eager"):
            raise ValueError(f"losses must be 'fused' or 'eager'; got {self.losses!r}")
        if self.init not in ("auto", "random", "teacher-layers"):
            raise ValueError(f"init must be auto, random or teacher-layers; got {self.init!r}")
        if self.attention_form not in ("scores", "qk"):
            raise ValueError(f"attention_form must be 'scores' or 'qk'; got "
                             f"{self.attention_form!r}")
        for name, choices in LOSS_CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {choices}; got {getattr(self, name)!r}")
        if self.loss_balance not in LOSS_BALANCES:
            raise ValueError(f"loss_balance must be one of {LOSS_BALANCES}; got "
                             f"{self.loss_balance!r}")
        if self.loss_balance == "initial" and self.stage == "general":
            raise ValueError("loss_balance 'initial' scales each intermediate term to the "
                             "prediction loss at the start, which needs a task teacher's logits: "
                             "use it in stage task1 (general distillation has no prediction "
                             "loss)")
        attention_off = self.attention_loss == "none" or self.attention_weight == 0
        hidden_off = self.hidden_loss == "none" or (self.hidden_weight == 0
                                                    and self.embedding_weight == 0)
        if is_intermediate(self.stage) and attention_off and hidden_off:
            raise ValueError(f"stage {self.stage!r} has no loss left: --attention-loss/"
                             f"--attention-weight and --hidden-loss/--hidden-weight/"
                             f"--embedding-weight turn off every intermediate term")
        if self.student_family not in STUDENT_FAMILIES:
            raise ValueError(f"student_family must be one of {STUDENT_FAMILIES}; got "
                             f"{self.student_family!r}")
        if self.bf16 not in ("auto", "on", "off"):
            raise ValueError(f"bf16 must be auto, on or off; got {self.bf16!r}")
        out = dataclasses.replace(self)
        for key, value in STAGE_DEFAULTS[self.stage].items():
            if getattr(out, key) is None:
                setattr(out, key, value)
        if self.stage == "task1" and self.epochs is None and self.task in TASK1_EPOCHS:
            out.epochs = TASK1_EPOCHS[self.task]
        if out.max_length is None:
            out.max_length = default_max_length(self.task)
        for name in ("epochs", "batch_size", "lr", "max_length", "save_steps", "log_steps",
                     "task2_epochs", "task2_lr"):
            if getattr(out, name) is None:  # task2_*: not given
                continue
            if not getattr(out, name) > 0:
                raise ValueError(f"{name} must be > 0; got {getattr(out, name)}")
        return out


def ineffective_settings(cfg: DistillConfig, task: glue.Task | None) -> list[str]:
    """What a resolved config sets away from its default that has no effect in this stage or on
    this task (each a sentence naming the flag); the loop logs each as a warning."""
    defaults = DistillConfig(stage=cfg.stage, output_dir="", student="")
    changed = {f.name for f in dataclasses.fields(DistillConfig)
               if getattr(cfg, f.name) != getattr(defaults, f.name)}
    intermediate = is_intermediate(cfg.stage)
    notes = []
    def note(name, why):
        if name in changed:
            notes.append(f"--{name.replace('_', '-')} has no effect {why}")
    builds_from_teacher = cfg.init == "teacher-layers"   # the mapping picks the copied layers
    for name in ("attention_weight", "hidden_weight", "embedding_weight", "mapping",
                 "mapping_layers", "mapping_seed", "attention_form", "mask_padding",
                 "attention_loss", "hidden_loss"):
        if name.startswith("mapping") and builds_from_teacher:
            continue
        if not intermediate:
            note(name, f"in stage {cfg.stage!r} (it applies to the intermediate-layer losses of "
                       f"stages general and task1)")
    if cfg.stage != "task1":
        note("loss_balance", f"in stage {cfg.stage!r} (it scales task step 1's intermediate "
                             f"terms)")
    # step 1's loss balance measures the prediction loss (with its loss and temperature)
    measures_prediction = cfg.stage == "task1" and cfg.loss_balance == "initial"
    for name in ("prediction_weight", "temperature", "hard_label_weight", "prediction_loss"):
        if cfg.stage != "task2" and not (measures_prediction and
                                         name in ("temperature", "prediction_loss")):
            note(name, f"in stage {cfg.stage!r} (it applies to task step 2's prediction loss)")
    if (cfg.stage == "task2" or measures_prediction) and task is not None and task.is_regression:
        for name in ("temperature", "prediction_loss"):
            note(name, f"on the regression task {task.name!r}: the prediction loss is the mean "
                       f"squared error of the teacher's outputs there, not a softmax")
    if cfg.stage == "task2" and cfg.prediction_loss == "mse":
        note("temperature", "with --prediction-loss mse (the logits are compared as they are)")
    for name in ("task2_epochs", "task2_lr"):  # stage all hands them to step 2 as epochs, lr
        note(name, f"in stage {cfg.stage!r} (it sets step 2's --{name[6:]} of --stage all)")
    if cfg.teacher_cache is None:
        note("cache_dtype", "without --teacher-cache")
        note("rebuild_cache", "without --teacher-cache")
    return notes



def stage_defaults_table() -> str:
    """The optimisation defaults of every stage, as `--help` prints them."""
    keys = ("epochs", "batch_size", "lr", "warmup_ratio", "schedule")
    rows = [("stage", "--epochs", "--batch-size", "--lr", "--warmup-ratio", "--schedule")]
    for stage, values in STAGE_DEFAULTS.items():
        rows.append((stage, *(f"{values[k]:g}" if isinstance(values[k], float) else
                              str(values[k]) for k in keys)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    special = ", ".join(f"{t} {n:g}" for t, n in TASK1_EPOCHS.items())
    return ("defaults per stage (finetune-teacher: the finetune row):\n  "
            + "\n  ".join(lines)
            + f"\n  task1 --epochs by task: {special}"
            + "\n  --max-length: 64 for single-sentence tasks, 128 for sentence pairs")
