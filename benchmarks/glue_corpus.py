"""The general-distillation corpus that can be had here: every training sentence of the GLUE
tasks in a folder (train.tsv only: dev and test sets excluded), each distinct sentence once,
one per line.

    python -m benchmarks.glue_corpus --glue ../shared/data/glue --out corpus.txt

Pair tasks (MRPC, RTE) give both of their sentences, each on its own line.  The file is written
atomically; it prints how many lines came from each task.  It is `--corpus` of `tinybert-fast
distill --stage general`.
"""

from __future__ import annotations

import argparse
import os
import sys

from tinybert_fast import data
from tinybert_fast._io import atomic_write

TASKS = {"sst2": "SST-2", "cola": "CoLA", "mrpc": "MRPC", "rte": "RTE"}


def corpus_lines(glue_dir: str, tasks=TASKS) -> tuple[list[str], dict[str, int]]:
    """(distinct training sentences in task order, new lines per task)."""
    seen, lines, counts = set(), [], {}
    for task, folder in tasks.items():
        path = os.path.join(glue_dir, folder)
        before = len(lines)
        for example in data.load_examples(data.get_task(task), "train", path):
            for text in example.texts:
                text = " ".join(text.split())
                if text and text not in seen:
                    seen.add(text)
                    lines.append(text)
        counts[task] = len(lines) - before
    return lines, counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--glue", required=True, help="the GLUE folder (SST-2/, CoLA/, MRPC/, RTE/)")
    p.add_argument("--out", required=True, help="the corpus file to write")
    args = p.parse_args(argv)
    lines, counts = corpus_lines(args.glue)
    atomic_write(args.out, "".join(line + "\n" for line in lines))
    print(f"{args.out}: {len(lines)} lines ({', '.join(f'{t} {n}' for t, n in counts.items())})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
