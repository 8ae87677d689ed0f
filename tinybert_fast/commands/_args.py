"""Arguments that several subcommands share, each defined once: the data a run reads, the device
it runs on, and the optimisation and run flags of the training subcommands (distill,
finetune-teacher), with the DistillConfig they make."""

from __future__ import annotations

import argparse
import dataclasses
import os

from .. import glue
from ..distill import config
from ..errors import InputError


def add_data_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup, *,
                       task_required: bool = False, train_file: bool = True,
                       padding: bool = True, limits: tuple[str, ...] = ("train", "eval"),
                       max_length: int | None = None,
                       max_length_help: str = "default 64 single-sentence, 128 pairs") -> None:
    """The data flags: --task, --data-dir, (--train-file), --max-length,
    (--pad-to-max-length), and --limit-<split> for each of `limits` ("train", "eval").

    task_required: --task must be given (eval, cache); train_file: the run reads a training
    set (distill, finetune-teacher, cache); padding: its batches may be padded to --max-length;
    max_length: the default of --max-length (None: the stage decides, as max_length_help says).
    """
    p.add_argument("--task", required=task_required, choices=sorted(glue.TASKS))
    p.add_argument("--data-dir", help="local GLUE TSV folder (default: `datasets` by task name)")
    if train_file:
        p.add_argument("--train-file",
                       help="training TSV in the task's GLUE layout (e.g. augmented)")
    p.add_argument("--max-length", type=int, default=max_length,
                   help=None if max_length is not None else max_length_help)
    if padding:
        p.add_argument("--pad-to-max-length", action="store_true")
    for split in limits:
        what = {"train": "training", "eval": "dev"}[split]
        p.add_argument(f"--limit-{split}", type=int, help=f"use the first N {what} examples")


def add_device_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup,
                        help: str = "auto: this rank's GPU if any, else CPU") -> None:
    """--device (default "auto"; resolved by tinybert_fast._device.resolve_device)."""
    p.add_argument("--device", default="auto", help=help)


def add_training_arguments(p: argparse.ArgumentParser) -> None:
    """Data, optimisation and run flags shared by distill and finetune-teacher (whose --help
    ends with the table of the per-stage defaults)."""
    p.epilog = config.stage_defaults_table()
    add_data_arguments(p.add_argument_group("data"))
    g = p.add_argument_group("optimisation", "The first five default per stage (table below).")
    per_stage = "default: per stage, see the table below"
    g.add_argument("--epochs", type=float, help=f"passes over the training data ({per_stage})")
    g.add_argument("--batch-size", type=int, help=f"examples per step over all ranks ({per_stage})")
    g.add_argument("--lr", type=float, help=f"peak AdamW learning rate ({per_stage})")
    g.add_argument("--warmup-ratio", type=float,
                   help=f"fraction of the steps with a linear warm-up ({per_stage})")
    g.add_argument("--schedule", choices=["linear", "constant"],
                   help=f"after the warm-up: linear decay to 0, or constant ({per_stage})")
    g.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW weight decay (none on biases and LayerNorm weights)")
    g.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="clip the gradient norm to this (0: no clipping)")
    g.add_argument("--max-steps", type=int, help="stop after this many steps (default: epochs)")
    g.add_argument("--group-by-length", action="store_true",
                   help="batches of examples of similar lengths (shuffled windows of 50 "
                        "batches sorted by length): less padding, the same number of steps")
    g = p.add_argument_group("run")
    g.add_argument("--output-dir", required=True,
                   help="model/, summary.json, log.jsonl and the resume checkpoint go here")
    g.add_argument("--seed", type=int, default=42, help="data order, initialisation, dropout")
    add_device_argument(g)
    g.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="bfloat16 autocast (auto: on CUDA only)")
    g.add_argument("--save-steps", type=int, default=500,
                   help="write the resume checkpoint every N steps (and at each epoch's end)")
    g.add_argument("--log-steps", type=int, default=50, help="log.jsonl record every N steps")
    g.add_argument("--eval-batch-size", type=int, default=128,
                   help="batch size of evaluation and of the teacher-cache build")
    g.add_argument("--no-eval", dest="eval", action="store_false",
                   help="skip the dev evaluation at each epoch's end")
    g.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoint")
    g.add_argument("--keep-checkpoint", action="store_true",
                   help="keep <output-dir>/checkpoint (optimizer state) after a finished run; by "
                        "default it is deleted once the model is exported")
    g.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bars")


def config_from_args(args: argparse.Namespace, **overrides):
    """The DistillConfig of parsed arguments (every flag named as a field), with overrides."""
    fields = {f.name for f in dataclasses.fields(config.DistillConfig)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    values.update(overrides)
    return config.DistillConfig(**values)


def check_output_folder(path: str, flag: str) -> None:
    """An output folder a run will create (or write into): InputError naming the flag when the
    path, or a folder above it, is an existing file (os.makedirs would fail half-way)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise InputError("is a file, not a folder" if probe == os.path.abspath(path)
                         else f"{probe} is a file, not a folder", argument=flag, path=path,
                         expected="a folder to write into, or a path that does not exist yet")


def check_output_file(path: str, flag: str) -> None:
    """An output file a run will write: InputError naming the flag when it is a folder or its
    folder does not exist."""
    if os.path.isdir(path):
        raise InputError("is a folder", argument=flag, path=path, expected="a file path")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise InputError(f"its folder {folder} does not exist", argument=flag, path=path,
                         expected="a file in an existing folder")


def check_input_path(path: str | None, flag: str, kind: str) -> None:
    """An input the user named (kind "file" or "folder"): InputError naming the flag when it is
    missing or of the other kind.  None (not given) passes."""
    if path is None:
        return
    if not os.path.exists(path):
        raise InputError("no such file or folder", argument=flag, path=path,
                         expected=f"an existing {kind}")
    if (kind == "folder") != os.path.isdir(path):
        raise InputError(f"not a {kind}", argument=flag, path=path, expected=f"a {kind}")


def check_model(spec: str | None, flag: str, what: str = "model") -> None:
    """A model argument (tinybert_fast.checkpoints.check_model_argument): a local folder checked,
    a local path that does not exist refused, a hub id, a preset or a config.json passed on."""
    from ..checkpoints import check_model_argument
    if spec is None or spec in config.PRESETS or spec.endswith(".json"):
        return
    check_model_argument(spec, flag, what)


def check_training_paths(args: argparse.Namespace) -> None:
    """The paths of a distill / finetune-teacher command line, before anything loads: the model
    folders (--teacher, --student or --model, --tokenizer; tinybert_fast.checkpoints), the data
    (--data-dir, --train-file, --corpus) exist, --output-dir (and --teacher-cache) can be a
    folder."""
    for flag in ("teacher", "student", "model"):
        check_model(getattr(args, flag, None), f"--{flag}")
    check_model(args.tokenizer, "--tokenizer", "tokenizer")
    check_input_path(args.data_dir, "--data-dir", "folder")
    check_input_path(args.train_file, "--train-file", "file")
    check_input_path(getattr(args, "corpus", None), "--corpus", "file")
    check_output_folder(args.output_dir, "--output-dir")
    if getattr(args, "teacher_cache", None):
        check_output_folder(args.teacher_cache, "--teacher-cache")
