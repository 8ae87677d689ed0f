"""`tinybert-fast cache`: build a teacher cache ahead of distillation.

It stores exactly what `tinybert-fast distill --teacher-cache PATH` with the same teacher, data,
student layer count, mapping, max length and --attention-form will ask for (the mapped attention
scores, or with --attention-form qk the teacher's queries and keys, and hidden states for step 1,
the logits for step 2), so the distillation run opens it instead of building it.
"""

from __future__ import annotations

import argparse
import logging

from .. import mapping
from ._args import (add_data_arguments, add_device_argument, check_input_path,
                    check_model, check_output_folder)

log = logging.getLogger(__name__)

HELP = "run the teacher once over the training data and cache its outputs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher checkpoint dir or hub name")
    add_data_arguments(p, task_required=True, padding=False, limits=("train",))
    p.add_argument("--output", required=True, help="cache folder")
    p.add_argument("--student-layers", type=int, required=True,
                   help="the student's layer count M (the mapping picks the teacher layers)")
    p.add_argument("--mapping", choices=mapping.STRATEGIES, default="uniform")
    p.add_argument("--mapping-layers", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--mapping-seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "int8"], default="bf16")
    p.add_argument("--attention-form", "--attention-from", choices=["scores", "qk"],
                   default="scores", dest="attention_form",
                   help="as for distill: qk stores every example's Q and K (what "
                        "attention_mse_qk reads); scores stores scores, or Q and K where smaller; "
                        "--attention-from is its deprecated name")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rebuild", action="store_true",
                   help="remove the cache at --output and build it afresh (one built from other "
                        "training examples, another teacher or mapping is refused otherwise)")
    add_device_argument(p)
    p.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    check_model(args.teacher, "--teacher")
    check_input_path(args.data_dir, "--data-dir", "folder")
    check_input_path(args.train_file, "--train-file", "file")
    check_output_folder(args.output, "--output")
    from transformers import AutoConfig, AutoTokenizer

    from .. import data, train
    from .._device import resolve_device
    from ..distill.cache_glue import open_teacher_cache
    from ..distill.config import DistillConfig, default_max_length
    from ..distill.loop import training_examples
    from ..distill.models import load_teacher, pretrained
    from ..distill.targets import TeacherTargets

    device = resolve_device(args.device)
    task = data.get_task(args.task)
    max_length = args.max_length or default_max_length(args.task)
    teacher_config = pretrained("teacher", AutoConfig.from_pretrained, args.teacher)
    layer_map = mapping.layer_map(args.mapping, args.student_layers,
                                  teacher_config.num_hidden_layers, seed=args.mapping_seed,
                                  layers=args.mapping_layers)
    # what task step 1 (and then step 2) with these flags reads from the teacher
    step1 = DistillConfig(stage="task1", output_dir=args.output, student="",
                          mapping=args.mapping, attention_form=args.attention_form)
    targets = TeacherTargets.of(step1, layer_map, teacher_config)
    tokenizer = pretrained("teacher", AutoTokenizer.from_pretrained, args.teacher)
    examples = training_examples(task, data_dir=args.data_dir, train_file=args.train_file,
                                 limit=args.limit_train)
    train_set = data.TokenizedDataset(examples, tokenizer, max_length)
    teacher = load_teacher(args.teacher, "task1", task, device)
    cache, info = open_teacher_cache(
        args.output, teacher, tokenizer, train_set, targets, device=device,
        dist_state=train.Distributed(device),
        source={"task": args.task, "train_file": args.train_file, "data_dir": args.data_dir},
        max_length=max_length, dtype=args.dtype,
        batch_size=args.batch_size, progress=args.progress, rebuild=args.rebuild)
    log.info("teacher cache %s: %d examples, %.1f MB, fields %s, %s in %.1f s", args.output,
             len(train_set), cache.nbytes / 1e6, cache.layout.fields,
             "built" if info["built"] else "opened", info["seconds"])
    return 0
