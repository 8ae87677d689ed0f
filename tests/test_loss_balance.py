"""The loss balance "initial" (task step 1): every intermediate term starts at the size of the
prediction loss of the student's logits against the teacher's, times its weight; the scales are
measured once, logged, kept in the checkpoint and set back on resume.  Tiny random BERT models on
a slice of real SST-2 (test_distill's fixtures)."""

import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from test_distill import _cfg, _log, models  # noqa: F401  (models: the fixture)
from tinybert_fast import distill, glue
from tinybert_fast.distill.objective import Objective, StudentWithProjection
from tinybert_fast.distill.targets import TeacherTargets


def _soft_ce(student_logits, teacher_logits, temperature):
    """TinyBERT's soft cross-entropy, written out: the mean over all N x C entries of
    -softmax(z_t / T) * log softmax(z_s / T)."""
    p_t = torch.softmax(teacher_logits.double() / temperature, -1)
    return -(p_t * F.log_softmax(student_logits.double() / temperature, -1)).mean()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_each_term_starts_at_the_prediction_loss(models, temperature):
    """On the first batch: scale_T = P0 / T0 with P0 the soft cross-entropy of the student's
    logits against the teacher's (computed here from its formula), and the total is
    sum_T weight_T * P0."""
    from transformers import AutoTokenizer
    from tinybert_fast import data, mapping
    from tinybert_fast.distill.models import build_student, load_teacher
    cfg = _cfg(models, "unused", loss_balance="initial", attention_weight=2.0,
               hidden_weight=0.5, temperature=temperature).resolved()
    task = glue.get_task("sst2")
    teacher = load_teacher(models["teacher"], "task1", task, "cpu")
    layer_map = mapping.layer_map("uniform", 2, 4)
    targets = TeacherTargets.of(cfg, layer_map, teacher.config)
    assert targets.logits  # the reference needs the teacher's logits in step 1
    torch.manual_seed(0)
    student = build_student(models["student"], "task1", task, teacher.config, "random")
    model = StudentWithProjection(student, torch.nn.Linear(24, 32)).train()
    tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
    examples = data.load_examples(task, "train", cfg.data_dir)[:8]
    batch = data.collate([data.TokenizedDataset(examples, tokenizer, 64)[i] for i in range(8)],
                         tokenizer.pad_token_id, None, False)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    objective = Objective(cfg, task, targets, teacher)
    terms = objective(model, inputs, None)
    scales = objective.loss_scales
    with torch.no_grad():
        want_p0 = _soft_ce(student(**inputs).logits, teacher(**inputs).logits, temperature)
    assert scales["reference"] == pytest.approx(float(want_p0), rel=1e-5)
    assert set(scales["initial"]) == {"attention", "embedding", "hidden"}
    for name, t0 in scales["initial"].items():
        assert t0 == pytest.approx(float(terms[name].detach()), rel=1e-6)
        assert scales[name] == pytest.approx(float(want_p0) / t0, rel=1e-5)
    assert float(terms["total"].detach()) == pytest.approx((2.0 + 1.0 + 0.5) * float(want_p0),
                                                          rel=1e-5)
    # the scales are kept: the next batch's total is the scaled sum of its own terms
    again = objective(model, inputs, None)
    assert objective.loss_scales is scales
    want = sum(w * scales[k] * float(again[k].detach())
               for k, w in (("attention", 2.0), ("embedding", 1.0), ("hidden", 0.5)))
    assert float(again["total"].detach()) == pytest.approx(want, rel=1e-5)
    # a second objective in evaluation mode measures nothing: the configured weights
    evaluating = Objective(cfg, task, targets, teacher)
    model.eval()
    plain = {k: v.detach() for k, v in evaluating(model, inputs, None).items()}
    assert evaluating.loss_scales is None
    assert float(plain["total"]) == pytest.approx(
        2.0 * float(plain["attention"]) + float(plain["embedding"]) + 0.5 * float(plain["hidden"]),
        rel=1e-5)


def test_the_loop_logs_the_scales_and_a_resumed_run_keeps_them(models, tmp_path):
    """The run measures the scales on its first batch (log event "loss_balance", summary); a run
    resumed from its step-2 checkpoint sets them back instead of measuring them on step 3's batch,
    and ends with the weights of the run that never stopped."""
    full = tmp_path / "full"
    kw = dict(loss_balance="initial", max_steps=4, save_steps=2, keep_checkpoint=True,
              eval=False)
    summary = distill.distill(_cfg(models, full, **kw))
    (event,) = _log(full, "loss_balance")
    assert event["step"] == 1
    scales = {k: v for k, v in event.items() if k not in ("event", "stage", "step", "time")}
    assert summary["loss_scales"] == scales
    first = _log(full)[0]
    assert first["total"] == pytest.approx(3 * scales["reference"], rel=1e-5)
    # the same first batch without the balance: its raw terms are the measured T0
    plain = tmp_path / "plain"
    distill.distill(_cfg(models, plain, max_steps=1, eval=False))
    for name, t0 in scales["initial"].items():
        assert _log(plain)[0][name] == pytest.approx(t0, rel=1e-5)
    # resume from the step-2 checkpoint
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    for name in ("summary.json", "model"):
        path = resumed / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with open(resumed / "log.jsonl", "w", encoding="utf-8"):
        pass
    again = distill.distill(_cfg(models, resumed, resume=True, **kw))
    assert again["steps"] == 4 and _log(resumed, "loss_balance") == []
    assert again["loss_scales"] == scales
    assert [r["step"] for r in _log(resumed)] == [3, 4]
    from safetensors.torch import load_file
    a = load_file(full / "model" / "model.safetensors")
    b = load_file(resumed / "model" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_a_checkpoint_of_another_balance_or_bad_scales_is_refused(models):
    cfg = _cfg(models, "unused", loss_balance="initial").resolved()
    objective = Objective(cfg, glue.get_task("sst2"), TeacherTargets(stage="task1"), None)
    good = {"attention": 2.0, "reference": 0.7, "initial": {"attention": 0.35}}
    objective.restore_loss_scales(good, "ckpt")
    assert objective.loss_scales == good
    for bad in ({"attention": 2.0}, {**good, "hidden": 1.0}, {**good, "reference": float("nan")},
                {**good, "attention": -1.0}, [1, 2]):
        with pytest.raises(ValueError, match="ckpt: the loss-balance scales are not"):
            objective.restore_loss_scales(bad, "ckpt")
    unbalanced = Objective(_cfg(models, "unused").resolved(), None, TeacherTargets("task1"), None)
    with pytest.raises(ValueError, match="this run has loss_balance 'none'"):
        unbalanced.restore_loss_scales(good, "ckpt")


def test_the_balance_is_refused_where_there_is_no_prediction_loss_and_noted_where_idle():
    base = dict(output_dir="o", student="tinybert4", teacher="t")
    with pytest.raises(ValueError, match="loss_balance 'initial' .* use it in stage task1"):
        distill.DistillConfig(stage="general", loss_balance="initial", **base).resolved()
    with pytest.raises(ValueError, match="loss_balance must be one of"):
        distill.DistillConfig(stage="task1", loss_balance="auto", **base).resolved()
    cfg = distill.DistillConfig(stage="task2", task="sst2", loss_balance="initial", **base)
    notes = distill.ineffective_settings(cfg.resolved(), glue.get_task("sst2"))
    assert [n.split()[0] for n in notes] == ["--loss-balance"]
    # in step 1 the balance measures the prediction loss: its loss and temperature count there
    cfg = distill.DistillConfig(stage="task1", task="sst2", loss_balance="initial",
                                temperature=2.0, prediction_loss="kl", **base)
    assert distill.ineffective_settings(cfg.resolved(), glue.get_task("sst2")) == []


def test_the_command_line_flag_reaches_the_config(models, tmp_path):
    from tinybert_fast import cli
    out = tmp_path / "cli"
    assert cli.main(["distill", "--stage", "task1", "--teacher", models["teacher"], "--student",
                     models["student"], "--task", "sst2", "--data-dir", _cfg(models, "x").data_dir,
                     "--limit-train", "16", "--batch-size", "8", "--max-steps", "1",
                     "--no-eval", "--no-progress", "--device", "cpu", "--loss-balance", "initial",
                     "--output-dir", str(out)]) == 0
    with open(out / "summary.json", encoding="utf-8") as f:
        assert set(json.load(f)["loss_scales"]) == {"attention", "embedding", "hidden",
                                                   "reference", "initial"}
    assert os.path.isfile(out / "model" / "config.json")
