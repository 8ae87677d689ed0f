"""Which TinyBERT4 learns an MPNet teacher better: an MPNet-family student or a BERT student on
MPNet's vocabulary?  (`--student-family teacher|bert`.)

    python -m benchmarks.student_family --teacher /path/all-mpnet-base-v2 \
        --corpus corpus.txt --train 4000 --heldout 1000 --steps 400 --out family.json

Both students are general-distilled from the same teacher on the same first `--train` corpus
lines (one teacher cache, built once and read by both), with the same seed, schedule and step
count; then each one's step-1 objective (attention MSE on the pre-softmax scores, position bias
included, + embedding and hidden MSE through its projection; padding excluded, as with the
cache) is measured on the next `--heldout` lines, which neither saw, with the live teacher.
The lower held-out loss learns better.  Writes the JSON atomically and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from tinybert_fast import data, train
from tinybert_fast._io import atomic_write
from tinybert_fast.distill import DistillConfig, distill
from tinybert_fast.distill.config import PROJECTION_FILE
from tinybert_fast.distill.objective import Objective, StudentWithProjection
from tinybert_fast.distill.targets import TeacherTargets

FAMILIES = ("teacher", "bert")


@torch.no_grad()
def heldout_terms(cfg: DistillConfig, model_dir: str, lines: list[str]) -> dict[str, float]:
    """The mean over held-out batches of each step-1 term of the student in `model_dir`."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    from tinybert_fast import capture, mapping
    from tinybert_fast.distill.models import load_teacher
    cfg = cfg.resolved()
    tokenizer = AutoTokenizer.from_pretrained(cfg.teacher)
    teacher = load_teacher(cfg.teacher, "general", None, torch.device("cpu"))
    student = AutoModel.from_pretrained(model_dir, attn_implementation=capture.register()).eval()
    projection = torch.nn.Linear(student.config.hidden_size, teacher.config.hidden_size)
    projection.load_state_dict(torch.load(os.path.join(model_dir, PROJECTION_FILE)))
    layer_map = mapping.layer_map(cfg.mapping, student.config.num_hidden_layers,
                                  teacher.config.num_hidden_layers)
    targets = TeacherTargets.of(dataclasses.replace(cfg, mask_padding=True), layer_map,
                                teacher.config)
    objective = Objective(dataclasses.replace(cfg, mask_padding=True), None, targets, teacher)
    model = StudentWithProjection(student, projection)
    ds = data.TokenizedDataset([data.Example((t,), None) for t in lines], tokenizer,
                               cfg.max_length)
    by_length = sorted(range(len(ds)), key=lambda i: len(ds.input_ids[i]))
    batches = [by_length[i:i + cfg.batch_size] for i in range(0, len(ds), cfg.batch_size)]
    sums, n = {}, 0
    for batch in data.iterate_batches(ds, batches, tokenizer.pad_token_id, None, False):
        inputs = {k: batch[k] for k in train.model_inputs(student, batch)}
        size = batch["input_ids"].shape[0]
        for k, v in objective(model, inputs, None).items():
            sums[k] = sums.get(k, 0.0) + float(v) * size
        n += size
    return {k: v / n for k, v in sums.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True)
    p.add_argument("--corpus", required=True, help="one sentence per line (benchmarks.glue_corpus)")
    p.add_argument("--train", type=int, default=4000, help="training lines (the first N)")
    p.add_argument("--heldout", type=int, default=1000, help="held-out lines (the next N)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--work", required=True, help="folder for the cache and the two runs")
    p.add_argument("--out", required=True, help="the JSON to write")
    args = p.parse_args(argv)
    with open(args.corpus, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if len(lines) < args.train + args.heldout:
        print(f"student_family: --corpus has {len(lines)} lines, fewer than --train + --heldout",
              file=sys.stderr)
        return 2
    os.makedirs(args.work, exist_ok=True)
    train_file = os.path.join(args.work, "train.txt")
    atomic_write(train_file, "".join(t + "\n" for t in lines[:args.train]))
    heldout = lines[args.train:args.train + args.heldout]
    rows = {}
    for family in FAMILIES:
        cfg = DistillConfig(
            stage="general", output_dir=os.path.join(args.work, family), student="tinybert4",
            student_family=family, teacher=args.teacher, corpus=train_file, max_length=128,
            batch_size=args.batch_size, lr=args.lr, warmup_ratio=0.1, schedule="linear",
            epochs=1000, max_steps=args.steps, group_by_length=True, resume=True,
            teacher_cache=os.path.join(args.work, "cache"), progress=False)
        t0 = time.perf_counter()
        summary = distill(cfg)
        rows[family] = {"train_seconds": summary["train_seconds"],
                        "wall_seconds": time.perf_counter() - t0, "steps": summary["steps"],
                        "heldout": heldout_terms(cfg, summary["model_dir"], heldout)}
        print(family, json.dumps(rows[family]), flush=True)
    best = min(rows, key=lambda f: rows[f]["heldout"]["total"])
    result = {"teacher": args.teacher, "train_lines": args.train, "heldout_lines": args.heldout,
              "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
              "command": " ".join(["python -m benchmarks.student_family", *sys.argv[1:]]),
              "families": rows, "lower_heldout_loss": best}
    atomic_write(args.out, json.dumps(result, indent=1) + "\n")
    print("| student | held-out total | attention | embedding | hidden |\n|---|---|---|---|---|")
    for family, row in rows.items():
        h = row["heldout"]
        print(f"| {family} | {h['total']:.4f} | {h.get('attention', 0):.4f} | "
              f"{h.get('embedding', 0):.4f} | {h.get('hidden', 0):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
