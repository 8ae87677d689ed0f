"""`tinybert-fast distill`: distil a student from a teacher (TinyBERT general distillation, task
step 1, step 2, or both task steps); the loop is tinybert_fast.distill."""

from __future__ import annotations

import argparse
import json
import logging

from .. import mapping
from ..distill import config
from ._args import add_training_arguments, check_training_paths, config_from_args

log = logging.getLogger("tinybert_fast.distill")

HELP = "distil a student from a teacher (TinyBERT general / task step 1 / step 2)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stage", required=True, choices=["general", "task1", "task2", "all"],
                   help="general: intermediate losses on a corpus; task1: the same on task data; "
                        "task2: the prediction loss; all: task1 then task2")
    p.add_argument("--task2-epochs", type=float,
                   help="with --stage all: step 2's --epochs (default: --epochs if given, else "
                        "the task2 default)")
    p.add_argument("--task2-lr", type=float,
                   help="with --stage all: step 2's --lr (default: --lr if given, else the task2 "
                        "default)")
    p.add_argument("--teacher", required=True, help="teacher checkpoint dir or hub name")
    p.add_argument("--student", required=True,
                   help=f"preset {sorted(config.PRESETS)}, a config.json, a checkpoint dir or a "
                        f"hub name")
    p.add_argument("--student-family", choices=config.STUDENT_FAMILIES, default="teacher",
                   help="a preset student's model family: the teacher's (an MPNet teacher gives "
                        "an MPNet student, with its position bias) or bert (a BERT student on "
                        "the teacher's vocabulary); both share the teacher's tokenizer")
    p.add_argument("--tokenizer", help="default: the teacher's")
    p.add_argument("--init", choices=["auto", "random", "teacher-layers"], default="auto",
                   help="a new student's weights: random, or the teacher's embeddings and mapped "
                        "layers (teacher-layers: equal widths); auto = random")
    p.add_argument("--corpus", help="general distillation text (one passage per line)")
    g = p.add_argument_group("mapping and losses (intermediate losses: stages general and task1; "
                             "prediction loss: task2)")
    g.add_argument("--mapping", choices=mapping.STRATEGIES, default="uniform",
                   help="which teacher layers each student layer learns from")
    g.add_argument("--mapping-layers", type=lambda s: [int(x) for x in s.split(",")],
                   help="for --mapping list: teacher layers g(1..M), counted from 1, e.g. 3,6,9,12")
    g.add_argument("--mapping-seed", type=int, default=0, help="for --mapping random")
    g.add_argument("--attention-weight", type=float, default=1.0,
                   help="weight of the attention-score loss")
    g.add_argument("--hidden-weight", type=float, default=1.0,
                   help="weight of the hidden-state loss of the layers")
    g.add_argument("--embedding-weight", type=float, default=1.0,
                   help="weight of the embedding-layer loss")
    g.add_argument("--prediction-weight", type=float, default=1.0,
                   help="weight of step 2's loss on the teacher's outputs (soft cross-entropy; "
                        "MSE on a regression task)")
    g.add_argument("--hard-label-weight", type=float, default=0.0,
                   help="mix hard-label cross-entropy into step 2 (classic soft+hard KD)")
    g.add_argument("--temperature", type=float, default=1.0,
                   help="softmax temperature of step 2's soft cross-entropy (no effect on a "
                        "regression task)")
    g.add_argument("--loss-balance", choices=config.LOSS_BALANCES, default="none",
                   help="initial (task1): scale each intermediate term on the first batch to the "
                        "size of the prediction loss of the student's logits against the "
                        "teacher's (--prediction-loss at --temperature), times its weight; "
                        "measured once and kept in the checkpoint")
    g.add_argument("--attention-loss", choices=config.LOSS_CHOICES["attention_loss"],
                   default="mse",
                   help="mse: TinyBERT's score MSE; kl: MiniLM's KL(softmax(S_t) || "
                        "softmax(S_s)) per query row over the unpadded keys (padded rows "
                        "excluded; tbf.attention_kl_scores, or tbf.attention_kl_qk with "
                        "--attention-form qk); none: no attention term")
    g.add_argument("--hidden-loss", choices=config.LOSS_CHOICES["hidden_loss"], default="mse",
                   help="mse: TinyBERT's projected MSE; cosine: 1 - cos(X W^T + b, Y) per token "
                        "(tbf.hidden_cosine); none: no embedding and hidden terms")
    g.add_argument("--prediction-loss", choices=config.LOSS_CHOICES["prediction_loss"],
                   default="soft_ce",
                   help="step 2 on a classification task: soft_ce (TinyBERT's soft "
                        "cross-entropy), kl (T^2 KL(p_t || p_s) / N, Hinton's; "
                        "tbf.kl_divergence) or mse (of the logits)")
    g.add_argument("--losses", choices=["fused", "eager"], default="fused",
                   help="fused: the registered ops on the backend in effect (default 'auto': "
                        "Triton on CUDA tensors, the eager reference on CPU tensors); eager: "
                        "backend 'torch', the eager reference everywhere (the same as "
                        "TINYBERT_FAST_BACKEND=torch)")
    g.add_argument("--attention-form", "--attention-from", choices=["scores", "qk"],
                   default="scores", dest="attention_form",
                   help="qk: the attention loss from Q and K (tbf.attention_mse_qk); student and "
                        "teacher then run SDPA attention on every layer (with --teacher-cache, "
                        "the cache stores the teacher's Q and K); --attention-from is its "
                        "deprecated name")
    g.add_argument("--mask-padding", action="store_true",
                   help="exclude padded query rows and tokens from the intermediate losses "
                        "(TinyBERT keeps them; always on with --teacher-cache)")
    g = p.add_argument_group("teacher cache")
    g.add_argument("--teacher-cache", help="folder of cached teacher outputs: built on first "
                   "use, then the teacher runs no more (see tinybert_fast.cache)")
    g.add_argument("--cache-dtype", choices=["fp32", "bf16", "fp16", "int8"], default="bf16",
                   help="storage of the cached outputs (int8: per-row scales)")
    g.add_argument("--rebuild-cache", action="store_true",
                   help="remove the cache at --teacher-cache and build it afresh (a cache built "
                        "from other training examples, another teacher or mapping is refused "
                        "otherwise)")
    add_training_arguments(p)


def run(args: argparse.Namespace) -> int:
    check_training_paths(args)
    from ..distill import distill
    summary = distill(config_from_args(args))
    log.info("summary: %s", json.dumps(summary))
    return 0
