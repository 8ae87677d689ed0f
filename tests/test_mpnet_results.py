"""benchmarks.mpnet_results: glue_mpnet.json from the run folders of mpnet_glue_run.sh."""

import json
import math
import os

import pytest

from benchmarks import mpnet_results as mr

GLUE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue")


def _run(folder, score, n, seconds, command=None):
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({
        "dev": {"epoch": 3.0, "dev": {"score": score}}, "dev_examples": {"dev": n},
        "train_seconds": seconds}))
    if command:
        (folder / "command.txt").write_text(command + "\n")


def test_gathers_scores_times_and_commands(tmp_path):
    rte = tmp_path / "rte"
    _run(rte / "teacher", 0.66, 277, 3000.0, "tinybert-fast finetune-teacher ...")
    _run(rte / "task1", None, 277, 100.0, "tinybert-fast distill --stage task1 ...")
    _run(rte / "task2", 0.62, 277, 50.0, "tinybert-fast distill --stage task2 ...")
    _run(rte / "hard", 0.55, 277, 120.0)
    out = tmp_path / "glue_mpnet.json"
    assert mr.main([str(tmp_path), "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    row = got["tasks"]["rte"]
    assert set(got["tasks"]) == {"rte"} and row["metric"] == "accuracy"
    assert (row["teacher"], row["student"], row["hard_label_student"],
            row["task_only_student"]) == (0.66, 0.62, 0.55, None)
    assert row["dev_examples"] == 277
    assert row["train_seconds"] == {"teacher": 3000.0, "student": 150.0,
                                    "hard_label_student": 120.0, "task_only_student": None}
    assert row["commands"][1].startswith("tinybert-fast distill --stage task1")
    assert math.isclose(row["dev_se"], math.sqrt(0.66 * 0.34 / 277))
    assert mr.standard_error("mcc", 0.5, 1043) == (1 - 0.25) / math.sqrt(1042)
    assert "93.9%" in mr.table(got)          # 0.62 / 0.66
    assert mr.main([str(tmp_path / "missing")]) == 2


def _predictions(folder, predictions, labels):
    (folder / "predictions.json").write_text(json.dumps(
        {"dev": {"predictions": predictions, "labels": labels}}))


def test_the_student_is_paired_with_the_hard_label_student(tmp_path):
    cola = tmp_path / "cola"
    _run(cola / "teacher", 0.5, 8, 10.0)
    _run(cola / "task2", 0.5, 8, 10.0)
    _run(cola / "hard", 0.0, 8, 10.0)
    labels = [1, 1, 1, 1, 0, 0, 0, 0]
    _predictions(cola / "task2", [1, 1, 1, 0, 0, 0, 0, 1], labels)  # MCC 0.5
    out = tmp_path / "glue_mpnet.json"
    assert mr.main([str(tmp_path), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["tasks"]["cola"]["student_vs_hard_label"] is None
    _predictions(cola / "hard", [1] * 8, labels)  # MCC 0
    assert mr.main([str(tmp_path), "--out", str(out)]) == 0
    paired = json.loads(out.read_text())["tasks"]["cola"]["student_vs_hard_label"]
    assert paired["delta"] == 0.5 and paired["dev_examples"] == 8 and paired["seeds"] == [0]


def test_the_study_summary_checks_the_budget_against_the_majority_class(tmp_path):
    from benchmarks import mpnet_study_summary as ss
    glue = GLUE
    if not os.path.isdir(os.path.join(glue, "CoLA")):  # as every test that reads GLUE data
        pytest.skip(f"CoLA not found at {os.path.join(glue, 'CoLA')}")
    _run(tmp_path / "runs" / "cola" / "teacher", 0.55, 1043, 10.0)
    study = tmp_path / "study"
    study.mkdir()
    rows = ["cell,seed,dev_score"] + [f"{c},{s},{v}" for c, vals in
                                      (("base", (0.30, 0.32, 0.31)), ("a=1", (0.20, 0.22, 0.24)))
                                      for s, v in zip((1, 2, 3), vals)]
    (study / "results.csv").write_text("\n".join(rows) + "\n")
    (study / "results.md").write_text("| table |\n")
    out = tmp_path / "out"
    assert ss.main(["cola", str(tmp_path / "runs"), str(study), "--glue", glue,
                    "--out", str(out)]) == 0
    got = json.loads((out / "summary.json").read_text())
    assert (got["task"], got["majority_score"], got["dev_examples"], got["teacher_score"]) == (
        "cola", 0.0, 1043, 0.55)
    assert got["cells"] == 2 and got["runs"] == 6 and got["min_cell_mean"] == pytest.approx(0.22)
    assert got["min_cell_se_above_majority"] == pytest.approx(
        0.22 / ((1 - 0.22 ** 2) / math.sqrt(1042)))
    assert (out / "results.md").read_text() == "| table |\n"
    assert ss.main(["cola", str(tmp_path / "runs"), str(tmp_path / "none"), "--out",
                    str(out)]) == 2
