"""`tinybert-fast study`: run a grid of `distill` configurations (each cell once per seed,
resumable, the teacher once per set of teacher outputs) and tabulate them (tinybert_fast.study)."""

from __future__ import annotations

import argparse
import json
import logging

from ..errors import InputError
from ._args import check_output_folder

log = logging.getLogger("tinybert_fast.study")

HELP = "run a grid of distill configurations over seeds and tabulate them"

EPILOG = """\
Every flag the study does not know is passed to each run's `distill` (--stage, --teacher,
--student, --task, --data-dir, --epochs, ...).  Grid keys are distill options without their
dashes and with '_' (attention_weight, mapping, mapping_layers, hidden_weight, lr, ...);
a list-valued option's items are joined by ':' (mapping_layers=2:4:6,1:3:5); a switch takes
true/false (mask_padding=true,false).  The study sets --output-dir, --seed and --teacher-cache
itself.

  tinybert-fast study --output-dir study/mrpc --seeds 1,2 \\
      --grid mapping=uniform,top,bottom attention_weight=0.5,1 -- \\
      --stage task1 --teacher runs/mrpc/teacher/model --student tinybert4 \\
      --task mrpc --data-dir ../shared/data/glue/MRPC --epochs 3

Run the same command again to finish a killed study: finished runs are kept, an unfinished one
resumes from its checkpoint.  Output: results.csv (one row per run), results.md (one row per
cell: mean ± sd over seeds, the dev metric's standard error; then each cell against the
baseline, the cell of every key's first value, paired on the same dev examples: the score's
difference, its bootstrap 95% interval and p), paired.json, score.png and loss.png
(matplotlib), rewritten as each run finishes; runs/<cell>/seed<k>/ (each run), caches/ (the
shared teacher caches).  --design one-at-a-time varies one key at a time around the baseline.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.epilog = EPILOG
    p.add_argument("--output-dir", required=True,
                   help="the study's folder: runs/, caches/, results.csv, results.md, plots")
    p.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                   help="options to vary and their values (every combination is a cell)")
    p.add_argument("--grid-file", default=None,
                   help="a JSON or TOML table of key = [values], merged with --grid")
    p.add_argument("--design", choices=("product", "one-at-a-time"), default="product",
                   help="product: every combination of the values; one-at-a-time: the baseline "
                        "(each key's first value), then each other value of one key at a time "
                        "with the rest at the baseline")
    p.add_argument("--seeds", default="1",
                   help="comma-separated seeds; every cell runs once per seed")
    p.add_argument("--parallel", type=int, default=1,
                   help="runs at once (separate processes; one per GPU when several are "
                        "visible)")
    p.add_argument("--no-teacher-cache", dest="teacher_cache", action="store_false",
                   help="run the teacher live in every run instead of sharing teacher caches")
    p.add_argument("distill_args", nargs=argparse.REMAINDER,
                   help="the distill flags every run gets (after the study's flags, or after --)")


def _seeds(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise InputError("not comma-separated integers", argument="--seeds",
                         found=repr(text), expected="e.g. 1,2,3") from None


def parse_distill_argv(argv: list[str]):
    """A `distill` command line -> its DistillConfig (what tinybert_fast.study.plan checks each
    cell with): ValueError instead of argparse's exit for a bad one."""
    from . import distill as distill_command
    from ._args import config_from_args
    parser = argparse.ArgumentParser(prog="tinybert-fast distill", exit_on_error=False)
    distill_command.add_arguments(parser)
    try:
        args = parser.parse_args(argv)
    except argparse.ArgumentError as exc:
        raise ValueError(str(exc)) from exc
    except SystemExit as exc:  # argparse exits on a missing required option
        raise ValueError("the distill flags are incomplete (see the message above)") from exc
    return config_from_args(args)


def run(args: argparse.Namespace) -> int:
    from .. import study
    grid = study.parse_grid_flags(args.grid)
    if args.grid_file:
        from_file = study.load_grid_file(args.grid_file)
        both = sorted(set(grid) & set(from_file))
        if both:
            raise InputError(f"grid keys given in --grid and in the file: {', '.join(both)}",
                             argument="--grid-file", path=args.grid_file)
        grid.update(from_file)
    base = list(args.distill_args)
    if base[:1] == ["--"]:
        base = base[1:]
    check_output_folder(args.output_dir, "--output-dir")
    result = study.run_study(args.output_dir, grid, _seeds(args.seeds), base,
                             parse_argv=parse_distill_argv, parallel=args.parallel,
                             teacher_cache=args.teacher_cache, design=args.design)
    log.info("study: %s", json.dumps(result))
    if result["failed"]:
        log.error("study: %d runs failed: %s", len(result["failed"]),
                  ", ".join(result["failed"]))
        return 1
    return 0
