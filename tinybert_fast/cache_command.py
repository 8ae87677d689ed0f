"""`tinybert-fast cache`: build a teacher cache ahead of distillation.

It stores exactly what `tinybert-fast distill --teacher-cache PATH` with the same teacher, data,
student layer count, mapping, max length and --attention-from will ask for (the mapped attention
scores, or with --attention-from qk the teacher's queries and keys, and hidden states for step 1,
the logits for step 2), so the distillation run opens it instead of building it.
"""

from __future__ import annotations

import argparse
import logging

from . import data, distill, mapping, train

log = logging.getLogger(__name__)

HELP = "run the teacher once over the training data and cache its outputs"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--teacher", required=True, help="teacher checkpoint dir or hub name")
    p.add_argument("--task", required=True, choices=sorted(data.TASKS))
    p.add_argument("--data-dir", help="local GLUE TSV folder (default: `datasets`)")
    p.add_argument("--train-file", help="training TSV in the task's GLUE layout (e.g. augmented)")
    p.add_argument("--output", required=True, help="cache folder")
    p.add_argument("--student-layers", type=int, required=True,
                   help="the student's layer count M (the mapping picks the teacher layers)")
    p.add_argument("--mapping", choices=mapping.STRATEGIES, default="uniform")
    p.add_argument("--mapping-layers", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--mapping-seed", type=int, default=0)
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16", "int8"], default="bf16")
    p.add_argument("--attention-from", choices=["scores", "qk"], default="scores",
                   help="as for distill: qk stores every example's Q and K (what "
                        "attention_mse_qk reads); scores stores scores, or Q and K where smaller")
    p.add_argument("--max-length", type=int)
    p.add_argument("--limit-train", type=int)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    from transformers import AutoConfig, AutoTokenizer
    cfg = distill.DistillConfig(
        stage="task1", output_dir=args.output, student="-", teacher=args.teacher,
        task=args.task, data_dir=args.data_dir, train_file=args.train_file,
        mapping=args.mapping, mapping_layers=args.mapping_layers,
        mapping_seed=args.mapping_seed, teacher_cache=args.output, cache_dtype=args.dtype,
        attention_from=args.attention_from,
        max_length=args.max_length, limit_train=args.limit_train,
        eval_batch_size=args.batch_size, device=args.device, progress=args.progress).resolved()
    device = train.resolve_device(cfg.device)
    dist_state = train.Distributed(device)
    task = data.get_task(cfg.task)
    n_teacher = distill.pretrained("teacher", AutoConfig.from_pretrained,
                                   cfg.teacher).num_hidden_layers
    layer_map = mapping.layer_map(cfg.mapping, args.student_layers, n_teacher,
                                  seed=cfg.mapping_seed, layers=cfg.mapping_layers)
    tokenizer = distill.pretrained("teacher", AutoTokenizer.from_pretrained, cfg.teacher)
    examples = distill.load_training_examples(cfg, task)
    train_set = data.TokenizedDataset(examples, tokenizer, cfg.max_length)
    teacher = distill.load_teacher(cfg.teacher, "task1", task, device)
    cache, info = distill.teacher_cache(cfg, teacher, tokenizer, train_set, layer_map, device,
                                        dist_state)
    log.info("teacher cache %s: %d examples, %.1f MB, fields %s, %s in %.1f s", args.output,
             len(train_set), cache.nbytes / 1e6, cache.layout.fields,
             "built" if info["built"] else "opened", info["seconds"])
    return 0
