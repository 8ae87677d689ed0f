"""The loop: one stage of a run (or "all": task1, then task2 from task1's student), with
DDP, checkpoints and exact resume, logging, dev evaluation and the exported model."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import shutil
import time

import torch
from torch import nn

from .. import data, mapping, train
from .._device import resolve_device
from .cache_glue import dev_teacher_caches, teacher_cache
from .config import (PREDICTIONS_FILE, PROJECTION_FILE, TRAINING_FILE, DistillConfig,
                     head_trained, ineffective_settings, is_intermediate)
from .models import (STUDENT_ARG, _is_checkpoint, _is_pretrained, build_student, check_pair,
                     load_teacher, pretrained, student_config)
from .objective import Objective, StudentWithProjection
from .targets import TeacherTargets

log = logging.getLogger("tinybert_fast.distill")

def training_examples(task: data.Task | None, *, general: bool = False,
                      data_dir: str | None = None, train_file: str | None = None,
                      corpus: str | None = None, limit: int | None = None) -> list[data.Example]:
    """The training examples of a run: the task's train split (or `train_file`); for general
    distillation (`general`), the `corpus` file, else the task's text without its labels.
    limit: the first `limit` examples only."""
    if general:
        if corpus:
            examples = data.read_corpus(corpus)
        elif task is not None:  # task text without labels
            examples = [dataclasses.replace(e, label=None) for e in
                        data.load_examples(task, "train", data_dir, train_file)]
        else:
            raise ValueError("general distillation needs --corpus (or --task for its text)")
    else:
        examples = data.load_examples(task, "train", data_dir, train_file)
    return examples[:limit] if limit else examples


def load_training_examples(cfg: DistillConfig, task: data.Task | None) -> list[data.Example]:
    """training_examples with the arguments of a run's config."""
    return training_examples(task, general=cfg.stage == "general", data_dir=cfg.data_dir,
                             train_file=cfg.train_file, corpus=cfg.corpus,
                             limit=cfg.limit_train)


def train_step(model: nn.Module, objective: Objective, optimizer, scheduler, inputs: dict,
               labels, cached=None, *, max_grad_norm: float = 1.0, autocast=None,
               parameters=None) -> dict:
    """One optimisation step of the loop: the objective's terms on a batch (the teacher's
    outputs live, or `cached`: its TeacherBatch), backward, gradient clipping to max_grad_norm
    (0: none), the optimizer and schedule steps, zero_grad; returns the terms, detached (on the
    device: no sync).  model: StudentWithProjection (or DDP of it); autocast: a context (default
    none); parameters: what is clipped (default model.parameters())."""
    with autocast if autocast is not None else contextlib.nullcontext():
        terms = objective(model, inputs, labels, cached)
    terms["total"].backward()
    if max_grad_norm:
        torch.nn.utils.clip_grad_norm_(model.parameters() if parameters is None else parameters,
                                       max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {k: v.detach() for k, v in terms.items()}


def distill(cfg: DistillConfig) -> dict:
    """Run one stage (or "all": task1 then task2); returns the summary written to
    <output_dir>/summary.json."""
    if cfg.stage == "all":
        step1 = dataclasses.replace(cfg, stage="task1", task2_epochs=None, task2_lr=None,
                                    output_dir=os.path.join(cfg.output_dir, "task1"))
        step2 = dataclasses.replace(
            cfg, stage="task2", init="auto", output_dir=os.path.join(cfg.output_dir, "task2"),
            epochs=cfg.epochs if cfg.task2_epochs is None else cfg.task2_epochs,
            lr=cfg.lr if cfg.task2_lr is None else cfg.task2_lr, task2_epochs=None,
            task2_lr=None)
        step2.resolved()  # a bad step-2 setting fails now, not after step 1
        s1 = distill(step1)
        step2 = dataclasses.replace(step2, student=s1["model_dir"],
                                    rebuild_cache=False)  # step 1 rebuilt it
        s2 = distill(step2)
        summary = {"stage": "all", "task1": s1, "task2": s2, "model_dir": s2["model_dir"]}
        if int(os.environ.get("RANK", 0)) == 0:  # rank 0 writes, as each step does
            train.write_json_atomic(os.path.join(cfg.output_dir, "summary.json"), summary)
        return summary
    cfg = cfg.resolved()
    summary_path = os.path.join(cfg.output_dir, "summary.json")
    if cfg.resume and os.path.isfile(summary_path):
        log.info("%s already finished (%s); nothing to resume", cfg.output_dir, summary_path)
        with open(summary_path, encoding="utf-8") as f:
            return json.load(f)
    return _Run(cfg).train()


class _Run:
    def __init__(self, cfg: DistillConfig):
        from transformers import AutoConfig, AutoTokenizer, BertConfig
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dist = train.Distributed(self.device)
        self.bf16 = cfg.bf16 == "on" or (cfg.bf16 == "auto" and self.device.type == "cuda")
        train.seed_everything(cfg.seed)
        if cfg.stage != "general" and cfg.task is None:
            raise ValueError(f"stage {cfg.stage!r} needs --task")
        self.task = data.get_task(cfg.task) if cfg.task else None
        if cfg.stage != "finetune" and not cfg.teacher:
            raise ValueError(f"stage {cfg.stage!r} needs --teacher")

        # Everything a bad argument can break is checked before the data and models load fully.
        teacher_config = pretrained("teacher", AutoConfig.from_pretrained, cfg.teacher) \
            if cfg.teacher else None
        # the tokenizer: --tokenizer, else the teacher's, else a pretrained student's
        if cfg.tokenizer:
            tok_arg, tok_source = "tokenizer (--tokenizer)", cfg.tokenizer
        elif cfg.teacher:
            tok_arg, tok_source = "teacher", cfg.teacher
        elif _is_pretrained(cfg.student):
            tok_arg, tok_source = STUDENT_ARG, cfg.student
        else:
            raise ValueError("no tokenizer: pass --tokenizer (or a --teacher / checkpoint "
                             "--student that has one)")
        self.tokenizer = pretrained(tok_arg, AutoTokenizer.from_pretrained, tok_source)
        if self.tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {tok_source!r} has no pad token")
        # presets take vocabulary and position sizes from the teacher (or the tokenizer)
        self.base_config = teacher_config or BertConfig(vocab_size=len(self.tokenizer))
        s_config = student_config(cfg.student, self.base_config, cfg.student_family)
        self.layer_map = None
        if is_intermediate(cfg.stage):
            self.layer_map = mapping.layer_map(cfg.mapping, s_config.num_hidden_layers,
                                               teacher_config.num_hidden_layers,
                                               seed=cfg.mapping_seed, layers=cfg.mapping_layers)
        self.targets = TeacherTargets.of(cfg, self.layer_map, teacher_config)
        if teacher_config is not None:
            check_pair(s_config, teacher_config, self.targets, self.tokenizer)

        # the teacher layers a new student is built from (--init teacher-layers): the stage's
        # mapping, or in task step 2 (no intermediate losses) the mapping the flags give
        self.init_map = self.layer_map
        if cfg.init == "teacher-layers" and self.init_map is None and teacher_config is not None:
            self.init_map = mapping.layer_map(cfg.mapping, s_config.num_hidden_layers,
                                              teacher_config.num_hidden_layers,
                                              seed=cfg.mapping_seed, layers=cfg.mapping_layers)

        examples = load_training_examples(cfg, self.task)
        self.train_set = data.TokenizedDataset(examples, self.tokenizer, cfg.max_length)
        self.dev_sets = {}
        self.dev_predictions = {}   # {split: predictions [n]} of the last evaluation
        if cfg.eval and self.task is not None:
            for split in self.task.dev_splits:
                dev = data.load_examples(self.task, split, cfg.data_dir)
                dev = dev[:cfg.limit_eval] if cfg.limit_eval else dev
                self.dev_sets[split] = data.TokenizedDataset(dev, self.tokenizer, cfg.max_length)

        self.teacher = (load_teacher(cfg.teacher, cfg.stage, self.task, self.device)
                        if cfg.stage != "finetune" else None)
        init = "random" if cfg.init == "auto" else cfg.init
        self.student = build_student(cfg.student, cfg.stage, self.task, self.base_config, init,
                                     self.init_map, self.teacher, cfg.student_family
                                     ).to(self.device).train()
        projection = None
        if self.targets.hidden:
            d_s, d_t = self.student.config.hidden_size, teacher_config.hidden_size
            projection = nn.Linear(d_s, d_t)
            saved = os.path.join(cfg.student, PROJECTION_FILE)
            if _is_checkpoint(cfg.student) and os.path.isfile(saved):
                projection.load_state_dict(torch.load(saved, map_location="cpu"))
            elif init == "teacher-layers":
                # The student's layers are the teacher's: start the projection at the identity,
                # so the hidden loss starts at what the copied layers give (a random W would make
                # step 1's first updates pull the copied layers away from the teacher's).
                with torch.no_grad():
                    projection.weight.copy_(torch.eye(d_t, d_s))
                    projection.bias.zero_()
            projection = projection.to(self.device)
        self.model = StudentWithProjection(self.student, projection)
        self.objective = Objective(cfg, self.task, self.targets, self.teacher)
        self.cache, self.cache_info = None, None
        self.dev_caches = {}   # {split: TeacherCache} for step 1's dev losses (main rank)
        if cfg.teacher_cache:
            from .. import cache as cache_mod
            weights = cache_mod.hash_state_dict(self.teacher)  # once: it reads every weight
            if self.objective.intermediate and self.dist.is_main and self.dev_sets:
                # before the training cache: a study's runs wait for that one's manifest
                self.dev_caches = dev_teacher_caches(cfg, self.teacher, self.tokenizer,
                                                     self.dev_sets, self.targets, self.device,
                                                     teacher_weights=weights)
            self.cache, self.cache_info = teacher_cache(cfg, self.teacher, self.tokenizer,
                                                        self.train_set, self.targets,
                                                        self.device, self.dist,
                                                        teacher_weights=weights)
        self.ddp = self.model
        if self.dist.enabled:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda"
                else None, find_unused_parameters=True)

        self.lengths = ([len(ids) for ids in self.train_set.input_ids]
                        if cfg.group_by_length else None)
        self.steps_per_epoch = len(data.batch_indices(
            len(self.train_set), cfg.batch_size, 0, cfg.seed, rank=self.dist.rank,
            world_size=self.dist.world_size, lengths=self.lengths))
        total = math.ceil(cfg.epochs * self.steps_per_epoch)
        self.total_steps = min(total, cfg.max_steps) if cfg.max_steps else total
        self.optimizer = train.make_optimizer(self.model.named_parameters(), cfg.lr,
                                              cfg.weight_decay)
        self.scheduler = train.make_schedule(self.optimizer, cfg.schedule, self.total_steps,
                                             cfg.warmup_ratio)
        self.step = 0
        self.examples_seen = 0
        self.train_seconds = 0.0
        self.checkpoint_dir = os.path.join(cfg.output_dir, "checkpoint")
        self.log = train.JsonlLog(os.path.join(cfg.output_dir, "log.jsonl")
                                  if self.dist.is_main else None)
        if self.cache_info is not None:
            self.log.write(event="teacher_cache", stage=cfg.stage, **self.cache_info)
        for note in ineffective_settings(cfg, self.task):
            log.warning("%s", note)

    # checkpoints
    def save_checkpoint(self) -> None:
        if self.dist.is_main:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                     "scheduler": self.scheduler.state_dict(), "step": self.step,
                     "examples_seen": self.examples_seen, "train_seconds": self.train_seconds,
                     "rng": train.rng_state(), "config": dataclasses.asdict(self.cfg),
                     "loss_scales": self.objective.loss_scales}
            train.atomic_save_dir(self.checkpoint_dir,
                                  lambda d: torch.save(state, os.path.join(d, "trainer_state.pt")))
        self.dist.barrier()

    def maybe_resume(self) -> None:
        path = train.latest_dir(self.checkpoint_dir) if self.cfg.resume else None
        if path is None:
            if self.cfg.resume:
                log.info("no checkpoint under %s: starting from scratch", self.checkpoint_dir)
            return
        state = torch.load(os.path.join(path, "trainer_state.pt"), map_location="cpu",
                           weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step, self.examples_seen = state["step"], state["examples_seen"]
        self.train_seconds = state["train_seconds"]
        train.set_rng_state(state["rng"])
        self.objective.restore_loss_scales(state.get("loss_scales"), path)
        log.info("resumed from %s at step %d", path, self.step)

    def export(self) -> str:
        """The trained student (save_pretrained + tokenizer + projection) in <output>/model, with
        TRAINING_FILE saying which stage trained it and whether its prediction head was trained
        (step 1 and general distillation train the encoder only; `eval` warns on such a model)."""
        model_dir = os.path.join(self.cfg.output_dir, "model")
        if self.dist.is_main:
            def write(d):
                self.student.save_pretrained(d)
                self.tokenizer.save_pretrained(d)
                if self.model.projection is not None:
                    torch.save(self.model.projection.state_dict(), os.path.join(d, PROJECTION_FILE))
                train.write_json_atomic(os.path.join(d, TRAINING_FILE), {
                    "stage": self.cfg.stage, "task": self.cfg.task,
                    "head_trained": head_trained(self.cfg, self.task)})
            train.atomic_save_dir(model_dir, write)
        self.dist.barrier()
        return model_dir

    def evaluate(self) -> dict:
        """{split: metrics} on the dev sets: the task's metrics once the head is trained; in the
        intermediate stages (task1), whose head is untrained, the stage's loss terms on dev
        ("dev_attention", "dev_hidden", ...; the teacher runs on the dev batches)."""
        if not self.dist.is_main or not self.dev_sets:
            return {}
        if self.objective.intermediate:
            return {split: self._dev_losses(ds, self.dev_caches.get(split))
                    for split, ds in self.dev_sets.items()}
        metrics = {}
        for split, ds in self.dev_sets.items():
            metrics[split], self.dev_predictions[split] = train.evaluate_with_predictions(
                self.student, ds, self.task, self.cfg.eval_batch_size, self.device,
                self.tokenizer.pad_token_id, self.bf16)
        return metrics

    @torch.no_grad()
    def _dev_losses(self, dataset, cache=None) -> dict:
        """The mean over dev batches of each loss term of the stage's objective; the teacher's
        outputs from `cache` (the split's dev cache: padded positions excluded, as in training
        from a cache), else from the live teacher."""
        was_training = self.student.training
        self.student.eval()
        sums, n = {}, 0
        batches = data.batch_indices(len(dataset), self.cfg.eval_batch_size, 0, 0, shuffle=False)
        for ids, batch in zip(batches, data.iterate_batches(
                dataset, batches, self.tokenizer.pad_token_id, None, False)):
            inputs = {k: batch[k].to(self.device)
                      for k in train.model_inputs(self.student, batch)}
            cached = None if cache is None else cache.fetch(
                ids, self.device, attention_form=self.targets.attention_form or "scores")
            with train.autocast(self.device, self.bf16):
                terms = self.objective(self.model, inputs, None, cached)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            n += 1
        self.student.train(was_training)
        return {f"dev_{k}": float(v) / max(n, 1) for k, v in sums.items()}

    def train(self) -> dict:
        cfg = self.cfg
        self.maybe_resume()
        pad_to = cfg.max_length if cfg.pad_to_max_length else None
        regression = self.task is not None and self.task.is_regression
        bar = None
        if self.dist.is_main and cfg.progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.total_steps, initial=self.step, desc=f"{cfg.stage}",
                       dynamic_ncols=True)
        evals = []
        window = {"loss": 0.0, "n": 0, "examples": 0, "tokens": 0, "t0": time.perf_counter()}
        window_start = self.step
        while self.step < self.total_steps:
            epoch, done_in_epoch = divmod(self.step, self.steps_per_epoch)
            batches = data.batch_indices(len(self.train_set), cfg.batch_size, epoch, cfg.seed,
                                         rank=self.dist.rank, world_size=self.dist.world_size,
                                         lengths=self.lengths)
            todo = batches[done_in_epoch:]
            cached = (self.cache.prefetch(todo, self.device, pad_to=pad_to,
                                          attention_form=self.targets.attention_form or "scores")
                      if self.cache is not None else None)
            for batch in data.iterate_batches(self.train_set, todo,
                                              self.tokenizer.pad_token_id, pad_to, regression):
                t_step = time.perf_counter()
                measured = self.objective.loss_scales is not None
                terms = self._train_step(batch, next(cached) if cached is not None else None)
                if not measured and self.objective.loss_scales is not None:
                    self.log.write(event="loss_balance", stage=cfg.stage, step=self.step + 1,
                                   **self.objective.loss_scales)
                    log.info("loss balance: scales %s", self.objective.loss_scales)
                self.step += 1
                n_ex = int(batch["input_ids"].shape[0]) * self.dist.world_size
                self.examples_seen += n_ex
                self.train_seconds += time.perf_counter() - t_step
                window["loss"] = window["loss"] + terms["total"]  # on device: no sync per step
                window["n"] += 1
                window["examples"] += n_ex
                window["tokens"] += int(batch["attention_mask"].sum()) * self.dist.world_size
                if bar is not None:
                    bar.update(1)
                    if self.step % cfg.log_steps and self.step - window_start <= cfg.log_steps:
                        # before the first log step: the throughput so far (no device sync)
                        elapsed = time.perf_counter() - window["t0"]
                        bar.set_postfix(ex_s=f"{window['examples'] / max(elapsed, 1e-9):.0f}")
                if self.step % cfg.log_steps == 0 or self.step == self.total_steps:
                    self._log_window(window, terms, epoch, bar)
                if self.step % cfg.save_steps == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
                if self.step >= self.total_steps:
                    break
            if self.step % self.steps_per_epoch == 0 or self.step >= self.total_steps:
                metrics = self.evaluate()
                if metrics:
                    evals.append({"epoch": self.step / self.steps_per_epoch, **metrics})
                    self.log.write(event="eval", stage=cfg.stage, step=self.step, metrics=metrics)
                    log.info("%s step %d dev %s", cfg.stage, self.step, metrics)
                if self.step < self.total_steps:
                    self.save_checkpoint()
        if bar is not None:
            bar.close()
        model_dir = self.export()
        summary = {"stage": cfg.stage, "task": cfg.task, "steps": self.step,
                   "examples_seen": self.examples_seen,
                   "train_seconds": self.train_seconds,
                   "examples_per_second": self.examples_seen / max(self.train_seconds, 1e-9),
                   "dev": evals[-1] if evals else None, "evals": evals,
                   "dev_examples": {split: len(ds) for split, ds in self.dev_sets.items()},
                   "model_dir": model_dir,
                   "losses": cfg.losses, "device": str(self.device),
                   "world_size": self.dist.world_size, "teacher_cache": self.cache_info,
                   "loss_scales": self.objective.loss_scales}
        if self.dist.is_main:
            if self.dev_predictions:  # the last evaluation's, for paired comparisons of runs
                train.write_json_atomic(os.path.join(cfg.output_dir, PREDICTIONS_FILE), {
                    split: {"predictions": p.tolist(),
                            "labels": list(self.dev_sets[split].labels)}
                    for split, p in self.dev_predictions.items()})
            train.write_json_atomic(os.path.join(cfg.output_dir, "summary.json"), summary)
            self.log.write(event="summary", **summary)
            if not cfg.keep_checkpoint:  # the model is exported: the resume state has done its job
                for path in (self.checkpoint_dir, f"{self.checkpoint_dir}.old"):
                    shutil.rmtree(path, ignore_errors=True)
        return summary

    def _train_step(self, batch, cached) -> dict:
        inputs = {k: batch[k].to(self.device, non_blocking=True)
                  for k in train.model_inputs(self.student, batch)}
        labels = batch["labels"].to(self.device) if "labels" in batch else None
        return train_step(self.ddp, self.objective, self.optimizer, self.scheduler, inputs,
                          labels, cached, max_grad_norm=self.cfg.max_grad_norm,
                          autocast=train.autocast(self.device, self.bf16),
                          parameters=self.model.parameters())

    def _log_window(self, window, terms, epoch, bar) -> None:
        elapsed = time.perf_counter() - window["t0"]
        means = self.dist.mean(torch.stack([t.float() for t in terms.values()])).cpu()
        record = {"event": "train", "stage": self.cfg.stage, "step": self.step, "epoch": epoch,
                  **{k: float(v) for k, v in zip(terms, means)},
                  "mean_loss": float(window["loss"]) / max(window["n"], 1),
                  "lr": self.scheduler.get_last_lr()[0],
                  "examples_per_second": window["examples"] / max(elapsed, 1e-9),
                  "tokens_per_second": window["tokens"] / max(elapsed, 1e-9)}
        self.log.write(**record)
        if bar is not None:
            bar.set_postfix(loss=f"{record['mean_loss']:.4f}",
                            ex_s=f"{record['examples_per_second']:.0f}")
        window.update(loss=0.0, n=0, examples=0, tokens=0, t0=time.perf_counter())

