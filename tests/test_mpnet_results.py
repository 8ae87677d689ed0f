"""benchmarks.mpnet_results: glue_mpnet.json from the run folders of mpnet_glue_run.sh."""

import json
import math

from benchmarks import mpnet_results as mr


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
