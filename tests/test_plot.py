"""`tinybert-fast plot` (tinybert_fast.plot): the PNG and its curves from runs' log.jsonl."""

from __future__ import annotations

import json

import pytest

from tinybert_fast import cli, plot

pytest.importorskip("matplotlib", reason="plots need matplotlib (pip install -e '.[test]')")


def _run(folder, records):
    folder.mkdir()
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(folder)


@pytest.fixture
def runs(tmp_path):
    step1 = _run(tmp_path / "task1", [
        {"event": "teacher_cache", "seconds": 1.0},
        *({"event": "train", "step": s, "attention": 2.0 / s, "embedding": 0.1, "hidden": 0.5,
           "total": 2.6 / s, "lr": 1e-4} for s in (1, 2, 3)),
        {"event": "eval", "step": 3, "metrics": {"dev": {"dev_total": 1.5}}}])
    step2 = _run(tmp_path / "task2", [
        *({"event": "train", "step": s, "prediction": 0.7, "total": 0.7, "lr": 3e-5}
          for s in (1, 2)),
        {"event": "eval", "step": 1, "metrics": {"dev": {"accuracy": 0.8, "score": 0.8}}},
        {"event": "eval", "step": 2, "metrics": {"dev": {"accuracy": 0.85, "score": 0.85}}}])
    return step1, step2


def test_curves_per_term_and_run(runs, tmp_path):
    log = plot.read_log(runs[0])
    assert set(log["train"]) == {"attention", "embedding", "hidden", "total"}
    assert log["train"]["attention"] == ([1, 2, 3], [2.0, 1.0, 2.0 / 3])
    assert log["dev"] == ("dev_total", [3], [1.5])
    out = tmp_path / "curves.png"
    counts = plot.plot_runs(list(runs), str(out))
    assert counts == {"loss": 4 + 2, "lr": 2, "dev": 2}
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_command_and_its_errors(runs, tmp_path):
    out = tmp_path / "cli.png"
    assert cli.main(["plot", *runs, "--labels", "one,two", "--output", str(out)]) == 0
    assert out.stat().st_size > 1000
    assert cli.main(["plot", str(tmp_path / "nowhere"), "--output", str(out)]) == 2
    with pytest.raises(ValueError, match="has no log.jsonl"):
        plot.plot_runs([str(tmp_path / "nowhere")], str(out))
    with pytest.raises(ValueError, match="2 run folders"):
        plot.plot_runs(list(runs), str(out), labels=["one"])
    with pytest.raises(ValueError, match=".png"):
        plot.plot_runs(list(runs), str(tmp_path / "curves.pdf"))
