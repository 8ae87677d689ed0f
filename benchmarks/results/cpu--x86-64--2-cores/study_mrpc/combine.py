"""The MRPC study's one table (README "Studies", issue #14 point 3) from its studies' results.csv.

    python benchmarks/results/cpu--x86-64--2-cores/study_mrpc/combine.py

writes results.md and score.png beside this file: every cell's mean ± sd over its seeds, with the
dev score's standard error (tinybert_fast.study's table).  The parts share their common cell, one
configuration (uniform mapping, attention mse, hidden mse, weights 1), run once per seed in the
loss study:
  (a) mappings: uniform is that cell; bottom, top, mean, random from mapping_seed1/ (seed 1, run
      in an earlier session from the same teacher and init, which this session's uniform cell
      reproduced to the last bit) and mapping_seed2/ (seed 2);
  (b) losses: loss/ (attention mse|kl x hidden mse|cosine);
  (c) attention weights: 1 is that cell; 0.5 and 2 from weight/.
A folder not there yet (a study still running) is left out, and so are its cells.
"""

import csv
import os

from tinybert_fast import study
from tinybert_fast._io import atomic_write

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = "attention_loss=mse__hidden_loss=mse"
NUMBERS = ("seed", "dev_examples", "train_seconds", "examples_per_second")


def read(folder: str) -> list[dict]:
    """The rows of folder/results.csv with numbers as numbers; [] when there is none yet."""
    path = os.path.join(HERE, folder, "results.csv")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        for key in row:
            if key.startswith("dev_") or key in NUMBERS:
                row[key] = float(row[key]) if row[key] != "" else None
        row["seed"] = int(row["seed"])
        row["dev_examples"] = int(row["dev_examples"])
    return rows


def labelled(rows: list[dict], part: str, setting: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k == "cell" or k.startswith("dev_") or k in NUMBERS}
            | {"cell": f"{part}: {setting}", "part": part, "setting": setting} for r in rows]


def main() -> None:
    loss, weight = read("loss"), read("weight")
    mapping = read("mapping_seed1") + read("mapping_seed2")
    shared = [r for r in loss if r["cell"] == SHARED]
    rows = labelled(shared, "(a) mapping", "uniform")
    for name in ("bottom", "top", "mean", "random"):
        rows += labelled([r for r in mapping if r["cell"] == f"mapping={name}"], "(a) mapping",
                         name)
    for att in ("mse", "kl"):
        for hid in ("mse", "cosine"):
            rows += labelled([r for r in loss if r["cell"] ==
                              f"attention_loss={att}__hidden_loss={hid}"],
                             "(b) losses", f"attention {att}, hidden {hid}")
    for w in ("0.5", "1", "2"):
        rows += labelled(shared if w == "1" else
                         [r for r in weight if r["cell"] == f"attention_weight={w}"],
                         "(c) attention weight", w)
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    atomic_write(os.path.join(HERE, "results.md"),
                       study._markdown(rows, ["part", "setting"], cells))
    study.plot(HERE, [], rows)
    print(f"{len(rows)} runs in {len(cells)} cells -> {HERE}/results.md, score.png")


if __name__ == "__main__":
    main()
