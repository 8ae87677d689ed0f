"""Task step 1 on one CPU core, side by side: the loop from the teacher cache, the loop with the
live teacher, and TextBrewer configured with the same losses (issue 24, point 7).

    python -m benchmarks.bench_step_vs_peers [--quick] [--rounds 10] [--steps 3]
        [--textbrewer-python /work/venv-textbrewer/bin/python] [--budget-seconds 540]

The defaults (10 rounds of 3 steps each, after 1 warm-up step each) take about 8 minutes on one
free core of this machine (a step costs about 1.4 s of CPU from the cache, 6 s with the live
teacher, 7 s in TextBrewer); --budget-seconds stops starting rounds after 9 minutes.

The same MPNet -> TinyBERT4 step-1 batches (TinyBERT's intermediate losses: attention MSE on the
pre-softmax scores of the mapped teacher layers 3, 6, 9, 12 (1-based; MPNet's position bias
included), hidden MSE through one learned 312 -> 768 projection over the embeddings and the 4
states, weights 1; real sentence pairs of a GLUE training set, batch 32, max length 128, padded to
the longest of each batch; AdamW lr 5e-5, clip 1.0; fp32; `torch.set_num_threads(1)`; one student
init for every provider):

    cache       the loop's step (tinybert_fast.distill Objective) with the teacher's outputs from
                the teacher cache (open_teacher_cache builds it once for these batches, before
                any timing: its build time is reported apart; prefetch, as the loop does)
    live        the loop's step with the live teacher's forward (no grad) every step
    textbrewer  TextBrewer's GeneralDistiller, its own training step (distiller.train), the
                teacher live every step (it has no teacher-output store); intermediate matches
                attention_mse on the same layer pairs and hidden_mse with a 'linear' projection
                312 -> 768 on the 5 state pairs; the adaptors return the scores recorded by
                tinybert_fast.capture (TextBrewer's attention_mse would otherwise see the
                post-softmax probabilities that transformers returns)

Both of our providers exclude padded positions (`mask_padding`, which a cache always implies);
TextBrewer gets the attention mask as `inputs_mask`, so all three use the same entries.  The
normalisation differs: TextBrewer divides by the number of valid entries, the TinyBERT losses by
all of them (B*H*L*L, B*L*d).  Before timing, each provider's loss on the first batch (eval
mode) is computed and TextBrewer's is checked against ours converted to its normalisation
(`loss_check`): the same init on the same batch gives the same number.

TextBrewer lives in its own environment (it is a peer to beat, not a dependency), so it runs in a
worker process of that environment's Python (`--textbrewer-python`, default $TEXTBREWER_PYTHON or
/work/venv-textbrewer/bin/python), with this repository on PYTHONPATH for tinybert_fast.capture
and the model builders.  Made here with:

    python3 -m venv /work/venv-textbrewer
    /work/venv-textbrewer/bin/pip install torch==<this torch> transformers==<this transformers> \
        textbrewer

The providers are interleaved: after a warm-up round, each round runs --steps steps of `cache`,
then of `live` in this process, then of `textbrewer` in the worker (which waits, idle, while the
others run), so slow drift in the machine's load reaches all three.  Per-step wall and process
CPU times (CPU: all of the process's threads, the cache's prefetch thread included) give the
median and the 20th/80th percentiles of examples/s.  --budget-seconds stops starting new rounds.

Without --quick the teacher is the all-mpnet-base-v2 folder (benchmarks/mpnet_teacher.py builds
it); --quick uses tiny random MPNet models and a small vocabulary built from the sentences (a
smoke test, seconds).  Results: benchmarks/results/<device>/step_vs_peers.json (--quick: a file in
the temporary directory unless --output).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import torch
from torch import nn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLUE = os.path.join(REPO, "..", "shared", "data", "glue")
MPNET = "/work/models/all-mpnet-base-v2"
PROVIDERS = ("cache", "live", "textbrewer")
RESULT_TAG = "@@step_vs_peers "  # the worker's reply lines start with it (others are logs)


def default_textbrewer_python() -> str:
    return os.environ.get("TEXTBREWER_PYTHON", "/work/venv-textbrewer/bin/python")


# ----------------------------------------------------------------------------- set-up

FULL = dict(batch_size=32, max_length=128, batches=8, rounds=10, steps=3, warmup=1,
            student="tinybert4")
QUICK = dict(batch_size=4, max_length=128, batches=3, rounds=2, steps=2, warmup=1)
# tiny MPNet models for --quick: the teacher 4 x 32 (4 heads), the student 2 x 16 (4 heads)
QUICK_TEACHER = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                     intermediate_size=64)
QUICK_STUDENT = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=32)


def _tiny_tokenizer(examples):
    """An MPNet tokenizer (<s> A </s></s> B </s>, pad id 1) on a vocabulary made from the
    examples' words and characters, so that --quick needs no model folder."""
    from transformers import MPNetTokenizer
    words = {w for e in examples for text in e.texts if text
             for w in re.findall(r"\w+|[^\w\s]", text.lower())}
    chars = sorted({c for w in words for c in w})
    tokens = ["<s>", "<pad>", "</s>", "<unk>", "[UNK]", "<mask>", *chars,
              *(f"##{c}" for c in chars), *sorted(words - set(chars))]
    return MPNetTokenizer(vocab={t: i for i, t in enumerate(tokens)}, unk_token="[UNK]")


def _quick_models(root: str, examples) -> tuple[str, str]:
    """Tiny random MPNet teacher (saved with its tokenizer) and student config.json: (teacher
    folder, student spec)."""
    from transformers import MPNetConfig, MPNetForSequenceClassification
    tokenizer = _tiny_tokenizer(examples)
    common = dict(vocab_size=len(tokenizer), pad_token_id=1, max_position_embeddings=514)
    torch.manual_seed(0)
    teacher = MPNetForSequenceClassification(MPNetConfig(**common, **QUICK_TEACHER))
    path = os.path.join(root, "teacher")
    teacher.save_pretrained(path)
    tokenizer.save_pretrained(path)
    student = os.path.join(root, "student.json")
    with open(student, "w", encoding="utf-8") as f:
        json.dump({"model_type": "mpnet", **common, **QUICK_STUDENT}, f)
    return path, student


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _digest(input_ids: torch.Tensor) -> str:
    return hashlib.blake2b(input_ids.contiguous().numpy().tobytes(), digest_size=8).hexdigest()


def _sequence_digest(digests: list[str]) -> str:
    """One digest of the ordered per-step batch digests (equal iff the same batches ran in the
    same order)."""
    return hashlib.blake2b("".join(digests).encode(), digest_size=8).hexdigest()


class Setup:
    """Everything the providers share: the config, targets, layer map, teacher folder, student
    init, projection init and the batches (tensors, and example ids for the cache)."""

    def __init__(self, args, root: str):
        from tinybert_fast import data, distill, mapping
        from transformers import AutoConfig, AutoTokenizer
        self.args, self.root = args, root
        self.task = data.get_task(args.task)
        data_dir = args.data_dir or os.path.join(GLUE, self.task.glue_dir)
        n = args.batches * args.batch_size
        examples = data.load_examples(self.task, "train", data_dir)[:n]
        if len(examples) < n:
            raise ValueError(f"--batches {args.batches} x --batch-size {args.batch_size} needs "
                             f"{n} training examples; {data_dir} has {len(examples)}")
        if args.quick:
            self.teacher_dir, student_spec = _quick_models(root, examples)
        else:
            if not os.path.isfile(os.path.join(args.teacher, "config.json")):
                raise ValueError(f"--teacher {args.teacher!r}: no model folder there (build it "
                                 f"with python -m benchmarks.mpnet_teacher)")
            self.teacher_dir, student_spec = args.teacher, args.student
        self.tokenizer = AutoTokenizer.from_pretrained(self.teacher_dir)
        teacher_config = AutoConfig.from_pretrained(self.teacher_dir)
        self.cfg = distill.DistillConfig(
            stage="task1", output_dir=os.path.join(root, "run"), student=student_spec,
            teacher=self.teacher_dir, task=args.task, data_dir=data_dir, lr=args.lr,
            batch_size=args.batch_size, max_length=args.max_length, mask_padding=True,
            cache_dtype=args.cache_dtype, bf16="off", device="cpu", seed=args.seed,
            progress=False).resolved()
        s_config = distill.student_config(student_spec, teacher_config)
        self.layer_map = mapping.layer_map(self.cfg.mapping, s_config.num_hidden_layers,
                                           teacher_config.num_hidden_layers)
        self.targets = distill.TeacherTargets.of(self.cfg, self.layer_map, teacher_config)
        distill.check_pair(s_config, teacher_config, self.targets, self.tokenizer)

        # one student init and one projection init for every provider
        torch.manual_seed(args.seed)
        student = distill.build_student(student_spec, "task1", self.task, teacher_config,
                                        "random")
        self.student_dir = os.path.join(root, "student_init")
        student.save_pretrained(self.student_dir)
        projection = nn.Linear(student.config.hidden_size, teacher_config.hidden_size)
        self.projection_file = os.path.join(root, "projection.pt")
        torch.save(projection.state_dict(), self.projection_file)
        self.student_parameters = sum(p.numel() for p in student.parameters())

        # real sentence pairs, shuffled into batches as the loop does, padded to each longest
        self.train_set = data.TokenizedDataset(examples, self.tokenizer, args.max_length)
        self.example_batches = data.batch_indices(len(self.train_set), args.batch_size, 0,
                                                  args.seed)
        self.batches = [{k: b[k] for k in ("input_ids", "attention_mask")} for b in
                        data.iterate_batches(self.train_set, self.example_batches,
                                             self.tokenizer.pad_token_id, None, False)]
        self.batches_file = os.path.join(root, "batches.pt")
        torch.save(self.batches, self.batches_file)

    def batch(self, step: int) -> dict:
        return self.batches[step % len(self.batches)]

    def worker_spec(self) -> dict:
        t = self.targets
        return {"teacher": self.teacher_dir, "student": self.student_dir,
                "projection": self.projection_file, "batches": self.batches_file,
                "task": self.args.task, "threads": self.args.threads,
                "teacher_attention_layers": list(t.attention_layers),
                "teacher_hidden_states": list(t.hidden_states),
                "student_layers": list(t.student_layers), "lr": self.cfg.lr,
                "weight_decay": self.cfg.weight_decay, "max_grad_norm": self.cfg.max_grad_norm,
                "output_dir": os.path.join(self.root, "textbrewer")}


def _optimizer(named_parameters, cfg):
    """The loop's optimizer (train.make_optimizer: AdamW, no decay on biases and LayerNorm) and a
    constant schedule (the learning rate does not change the work of a step)."""
    from tinybert_fast import train
    optimizer = train.make_optimizer(named_parameters, cfg.lr, cfg.weight_decay)
    return optimizer, train.make_schedule(optimizer, "constant", 1, 0.0)


# ----------------------------------------------------------------------------- our loop's step

class LoopStep:
    """The loop's task-1 step (tinybert_fast.distill.train_step): the Objective on the student
    and the teacher's outputs (live, or from the teacher cache's prefetch), backward, clipping,
    AdamW, schedule, zero_grad."""

    def __init__(self, name: str, setup: Setup, teacher, cache=None, total_steps: int = 0):
        from tinybert_fast import distill
        self.name, self.setup, self.cache = name, setup, cache
        cfg = setup.cfg
        student = distill.build_student(setup.student_dir, "task1", setup.task, None, "random")
        projection = nn.Linear(student.config.hidden_size, teacher.config.hidden_size)
        projection.load_state_dict(torch.load(setup.projection_file))
        self.model = distill.StudentWithProjection(student, projection).train()
        self.objective = distill.Objective(cfg, setup.task, setup.targets, teacher)
        self.optimizer, self.scheduler = _optimizer(self.model.named_parameters(), cfg)
        self.step_index = 0
        self.prefetch = None
        if cache is not None:  # one prefetch over all the steps, as the loop has one an epoch
            ids = [setup.example_batches[i % len(setup.batches)] for i in range(total_steps)]
            self.prefetch = cache.prefetch(ids, torch.device("cpu"), num_threads=setup.args.threads,
                                           attention_form=setup.targets.attention_form
                                           or "scores")

    def loss_terms(self, step: int) -> dict:
        """The objective's terms on the batch of `step`, in eval mode, no grad (the loss check;
        it reads the cache directly, not through the prefetch)."""
        batch = self.setup.batch(step)
        cached = None
        if self.cache is not None:
            cached = next(iter(self.cache.prefetch(
                [self.setup.example_batches[step % len(self.setup.batches)]],
                torch.device("cpu"),
                attention_form=self.setup.targets.attention_form or "scores")))
        self.model.eval()
        with torch.no_grad():
            terms = self.objective(self.model, dict(batch), None, cached)
        self.model.train()
        return {k: float(v) for k, v in terms.items()}

    def run(self, steps: int) -> dict:
        from tinybert_fast import distill
        wall, cpu, digests = [], [], []
        for _ in range(steps):
            batch = self.setup.batch(self.step_index)
            self.step_index += 1
            digests.append(_digest(batch["input_ids"]))
            t0, c0 = time.perf_counter(), time.process_time()
            cached = next(self.prefetch) if self.prefetch is not None else None
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
            distill.train_step(self.model, self.objective, self.optimizer, self.scheduler,
                               inputs, None, cached, max_grad_norm=self.setup.cfg.max_grad_norm)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        return {"wall": wall, "cpu": cpu, "digests": digests}


# ----------------------------------------------------------------------------- TextBrewer

class _Recorded(nn.Module):
    """model(input_ids, attention_mask) -> {"hidden": all hidden states, "attention": the
    pre-softmax scores of `layers` (tinybert_fast.capture; MPNet's position bias included)},
    what TextBrewer's adaptors read."""

    def __init__(self, model, layers):
        super().__init__()
        self.model, self.layers = model, list(layers)

    def forward(self, input_ids, attention_mask):
        from tinybert_fast import capture
        with capture.record_scores(self.layers) as rec:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             output_hidden_states=True)
        return {"hidden": list(out.hidden_states), "attention": list(rec.layers)}


def _adaptor(batch, outputs):
    return {"hidden": outputs["hidden"], "attention": outputs["attention"],
            "inputs_mask": batch["attention_mask"]}


class _Done(Exception):
    """The parent said quit: leaves TextBrewer's training loop."""


def _reply(obj) -> None:
    sys.stdout.write(RESULT_TAG + json.dumps(obj) + "\n")
    sys.stdout.flush()


def worker(spec_file: str) -> int:
    """The TextBrewer side (run by the TextBrewer environment's Python).  Protocol on
    stdin/stdout: after set-up it replies {"ready", "loss_check", "versions"}; then each line
    {"steps": n} runs n of TextBrewer's own steps and replies {"wall", "cpu", "digests"}; {"quit":
    true} ends it."""
    with open(spec_file, encoding="utf-8") as f:
        spec = json.load(f)
    torch.set_num_threads(spec["threads"])
    import textbrewer
    import transformers
    from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
    from tinybert_fast import data, distill, train
    task = data.get_task(spec["task"])
    teacher = distill.load_teacher(spec["teacher"], "task1", task, torch.device("cpu"))
    student = distill.build_student(spec["student"], "task1", task, None, "random").train()
    model_T = _Recorded(teacher, spec["teacher_attention_layers"])
    model_S = _Recorded(student, spec["student_layers"])
    d_s, d_t = student.config.hidden_size, teacher.config.hidden_size
    matches = [{"layer_T": j, "layer_S": j, "feature": "attention", "loss": "attention_mse",
                "weight": 1} for j in range(len(spec["teacher_attention_layers"]))]
    matches += [{"layer_T": t, "layer_S": j, "feature": "hidden", "loss": "hidden_mse",
                 "weight": 1, "proj": ["linear", d_s, d_t]}
                for j, t in enumerate(spec["teacher_hidden_states"])]
    os.makedirs(spec["output_dir"], exist_ok=True)
    distiller = GeneralDistiller(
        train_config=TrainingConfig(device="cpu", output_dir=spec["output_dir"], log_dir=None,
                                    ckpt_steps=10 ** 9),
        distill_config=DistillationConfig(intermediate_matches=matches, kd_loss_weight=0.0),
        model_T=model_T, model_S=model_S, adaptor_T=_adaptor, adaptor_S=_adaptor)
    projection = torch.load(spec["projection"])
    for proj in distiller.projs:  # TextBrewer makes one projection per match: all start as ours
        if proj is not None:
            proj.load_state_dict(projection)
    batches = torch.load(spec["batches"])

    # the loss check: TextBrewer's loss on the first batch, eval mode, from the shared init
    student.eval()
    with torch.no_grad():
        total, per_match = distiller.train_on_batch(dict(batches[0]), {})
    student.train()
    _reply({"ready": True, "loss_check": {"total": float(total),
                                          **{k: float(v) for k, v in per_match.items()}},
            "versions": {"textbrewer": textbrewer.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__,
                         "python": platform.python_version()}})

    class Rounds:
        """TextBrewer's dataloader: yields the parent's rounds of batches; a step's time runs
        from handing out its batch to TextBrewer's asking for the next (its whole step)."""

        def __iter__(self):
            i = 0
            while True:
                command = json.loads(sys.stdin.readline() or '{"quit": true}')
                if command.get("quit"):
                    raise _Done
                wall, cpu, digests = [], [], []
                for _ in range(command["steps"]):
                    batch = batches[i % len(batches)]
                    i += 1
                    digests.append(_digest(batch["input_ids"]))
                    t0, c0 = time.perf_counter(), time.process_time()
                    yield {"input_ids": batch["input_ids"],
                           "attention_mask": batch["attention_mask"]}
                    wall.append(time.perf_counter() - t0)
                    cpu.append(time.process_time() - c0)
                _reply({"wall": wall, "cpu": cpu, "digests": digests})

    optimizer = train.make_optimizer(model_S.named_parameters(), spec["lr"],
                                      spec["weight_decay"])
    with contextlib.suppress(_Done):
        distiller.train(optimizer, Rounds(), num_steps=10 ** 9,
                        scheduler_class=lambda optimizer: train.make_schedule(
                            optimizer, "constant", 1, 0.0), scheduler_args={},
                        max_grad_norm=spec["max_grad_norm"])
    return 0


class TextBrewerWorker:
    """The parent's handle on the worker process (started in __init__, set up, idle between
    rounds)."""

    name = "textbrewer"

    def __init__(self, python: str, setup: Setup):
        if not os.path.isfile(python):
            raise RuntimeError(f"--textbrewer-python {python!r}: no such interpreter (make the "
                               f"environment as the module docstring says)")
        spec_file = os.path.join(setup.root, "worker.json")
        with open(spec_file, "w", encoding="utf-8") as f:
            json.dump(setup.worker_spec(), f)
        env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=str(setup.args.threads))
        self.log_file = os.path.join(setup.root, "textbrewer.log")
        self.log = open(self.log_file, "w", encoding="utf-8")
        self.proc = subprocess.Popen(
            [python, "-m", "benchmarks.bench_step_vs_peers", "--worker", spec_file], cwd=REPO,
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.ready = self._read()

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(RESULT_TAG):
                return json.loads(line[len(RESULT_TAG):])
            self.log.write(line)
        self.log.flush()
        with open(self.log_file, encoding="utf-8") as f:
            tail = f.read()[-3000:]
        raise RuntimeError(f"the TextBrewer worker exited ({self.proc.wait()}):\n{tail}")

    def run(self, steps: int) -> dict:
        self.proc.stdin.write(json.dumps({"steps": steps}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.write('{"quit": true}\n')
                self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


# ----------------------------------------------------------------------------- the run

def _quantile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def _summary(times: dict, batch_size: int, how: str) -> dict:
    wall, cpu = times["wall"], times["cpu"]
    return {"examples_per_second_median": batch_size / _quantile(wall, 0.5),
            # p20 of examples/s is the 80th percentile of step times, and so on
            "p20": batch_size / _quantile(wall, 0.8), "p80": batch_size / _quantile(wall, 0.2),
            "step_ms_median": 1e3 * _quantile(wall, 0.5),
            "cpu_ms_per_step_median": 1e3 * _quantile(cpu, 0.5),
            "steps": len(wall), "batch_sequence": _sequence_digest(times["digests"]),
            "how": how}


def _textbrewer_prediction(live: dict, batch: dict, heads: int) -> float:
    """TextBrewer's total loss on `batch` predicted from our terms (the same masked entries):
    its attention_mse divides by H * sum_b n_b^2 (n_b = the valid tokens of example b) where ours
    divides by B*H*L*L, and its hidden_mse by sum_b n_b * d where ours divides by B*L*d."""
    mask = batch["attention_mask"].double()
    B, L = mask.shape
    n = mask.sum(1)
    attention = live["attention"] * B * L * L / float((n * n).sum())
    states = (live["embedding"] + live["hidden"]) * B * L / float(n.sum())
    return attention + states


def run(args) -> dict:
    from tinybert_fast import cache as tc
    from tinybert_fast import distill, train
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    root = tempfile.mkdtemp(prefix="tbf-vs-peers-")
    setup = Setup(args, root)
    teacher = distill.load_teacher(setup.teacher_dir, "task1", setup.task, torch.device("cpu"))
    total_steps = args.warmup + args.rounds * args.steps
    notes = [
        "TextBrewer's step includes its per-step .item() of the total and of each match's loss "
        "(write_loss; no TensorBoard writer: log_dir None) and its tqdm bar (to the worker's log)",
        "TextBrewer 0.2.1 takes teacher outputs that a user computed and stored if the batch "
        "carries them ('teacher_cache'); it has no store or builder of its own, and runs the "
        "teacher every step by default, as here",
        "CPU ms/step is the process's CPU time over all its threads (the cache's prefetch thread "
        "included): a median above the step's wall time means a second core did work"]

    if not tc.HAS_EXTENSION:
        raise RuntimeError(f"the teacher-cache extension is not available: {tc.EXTENSION_ERROR}")
    cache, cache_info = distill.open_teacher_cache(
        os.path.join(root, "cache"), teacher, setup.tokenizer, setup.train_set, setup.targets,
        device=torch.device("cpu"), dist_state=train.Distributed(torch.device("cpu")),
        source=distill.training_source(setup.cfg),
        max_length=args.max_length, dtype=args.cache_dtype, batch_size=setup.cfg.eval_batch_size,
        progress=False)

    providers = {"cache": LoopStep("cache", setup, teacher, cache, total_steps),
                 "live": LoopStep("live", setup, teacher)}
    versions = {"torch": torch.__version__, "python": platform.python_version()}
    import transformers
    versions["transformers"] = transformers.__version__
    loss_check = {name: p.loss_terms(0) for name, p in providers.items()}
    worker_proc = None
    if "textbrewer" in args.providers:
        try:
            worker_proc = TextBrewerWorker(args.textbrewer_python, setup)
        except (RuntimeError, OSError) as exc:
            notes.append(f"textbrewer did not run: {exc}")
        else:
            providers["textbrewer"] = worker_proc
            loss_check["textbrewer"] = worker_proc.ready["loss_check"]
            versions["textbrewer_environment"] = worker_proc.ready["versions"]
            predicted = _textbrewer_prediction(loss_check["live"], setup.batch(0),
                                               teacher.config.num_attention_heads)
            loss_check["textbrewer_predicted_from_live"] = predicted
            loss_check["textbrewer_relative_difference"] = (
                abs(loss_check["textbrewer"]["total"] - predicted) / abs(predicted))
    providers = {k: v for k, v in providers.items() if k in args.providers}

    times = {name: {"wall": [], "cpu": [], "digests": []} for name in providers}
    rounds_done = 0
    try:
        for r in range(args.rounds + 1):
            if r and args.budget_seconds and time.perf_counter() - started > args.budget_seconds:
                notes.append(f"stopped after {rounds_done} of {args.rounds} rounds: "
                             f"--budget-seconds {args.budget_seconds} reached")
                break
            for name, provider in list(providers.items()):
                try:
                    got = provider.run(args.warmup if r == 0 else args.steps)
                except RuntimeError as exc:  # the worker died: report the others
                    if provider is not worker_proc:
                        raise
                    notes.append(f"textbrewer stopped in round {r}: {exc}")
                    del providers[name]
                    continue
                if r == 0:
                    continue  # warm-up: the allocator, the first prefetch, the worker's imports
                for key in times[name]:
                    times[name][key].extend(got[key])
            rounds_done = r
    finally:
        if worker_proc is not None:
            worker_proc.close()

    how = {"cache": "in this process: distill.Objective on a StudentWithProjection, teacher "
                    f"outputs from open_teacher_cache ({args.cache_dtype}) through "
                    "TeacherCache.prefetch (one background thread), loss + backward + clip + "
                    "AdamW + schedule",
           "live": "in this process: the same step, the teacher's forward (no grad) every step",
           "textbrewer": "in a worker process of the TextBrewer environment, interleaved with "
                         "the others round by round (idle while they run): GeneralDistiller."
                         "train, its own step; teacher live; attention_mse x "
                         f"{len(setup.targets.attention_layers)} and hidden_mse x "
                         f"{len(setup.targets.hidden_states)} (one 'linear' projection per "
                         "match: TextBrewer has no shared projection), inputs_mask given"}
    result = {
        "device": f"{_cpu_name()}, {args.threads} thread(s) (torch.set_num_threads), "
                  f"{os.cpu_count()} cores in the machine",
        "versions": versions,
        "config": {"mode": "quick (tiny random MPNet models: a smoke test)" if args.quick
                   else "full", "teacher": setup.teacher_dir, "student": setup.cfg.student,
                   "student_parameters": setup.student_parameters, "task": args.task,
                   "batch_size": args.batch_size, "max_length": args.max_length,
                   "padded_lengths": [int(b["input_ids"].shape[1]) for b in setup.batches],
                   "distinct_batches": len(setup.batches), "rounds": rounds_done,
                   "steps_per_round": args.steps, "warmup_steps": args.warmup,
                   "threads": args.threads, "lr": setup.cfg.lr,
                   "max_grad_norm": setup.cfg.max_grad_norm,
                   "teacher_attention_layers": list(setup.targets.attention_layers),
                   "teacher_hidden_states": list(setup.targets.hidden_states),
                   "cache_dtype": args.cache_dtype, "mask_padding": True},
        "providers": {name: _summary(times[name], args.batch_size, how[name])
                      for name in providers if times[name]["wall"]},
        "cache_build_seconds": cache_info["seconds"], "cache_bytes": cache_info["bytes"],
        "loss_check": loss_check,
        "wall_seconds": time.perf_counter() - started,
        "notes": notes,
    }
    p = result["providers"]
    ratios = {}
    if "cache" in p and "live" in p:
        ratios["cache/live"] = (p["cache"]["examples_per_second_median"]
                                / p["live"]["examples_per_second_median"])
    if "cache" in p and "textbrewer" in p:
        ratios["cache/textbrewer"] = (p["cache"]["examples_per_second_median"]
                                      / p["textbrewer"]["examples_per_second_median"])
    if "live" in p and "textbrewer" in p:
        ratios["live/textbrewer"] = (p["live"]["examples_per_second_median"]
                                     / p["textbrewer"]["examples_per_second_median"])
    result["ratios"] = ratios
    return result


def table(result: dict) -> str:
    rows = ["| provider | examples/s (median) | p20 - p80 | step ms (median) | CPU ms/step | "
            "steps |", "|---|---:|---:|---:|---:|---:|"]
    for name, p in result["providers"].items():
        rows.append(f"| {name} | {p['examples_per_second_median']:.2f} | {p['p20']:.2f} - "
                    f"{p['p80']:.2f} | {p['step_ms_median']:.0f} | "
                    f"{p['cpu_ms_per_step_median']:.0f} | {p['steps']} |")
    rows.append("")
    rows.append(", ".join(f"{k} = {v:.2f}x" for k, v in result["ratios"].items())
                + f"; cache built in {result['cache_build_seconds']:.1f} s")
    return "\n".join(rows)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_step_vs_peers",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny random MPNet models")
    parser.add_argument("--teacher", default=MPNET, help="the MPNet teacher folder (full run)")
    parser.add_argument("--task", default="mrpc", help="GLUE task whose training sentences "
                        "make the batches")
    parser.add_argument("--data-dir", help="its TSV folder (default ../shared/data/glue/<TASK>)")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-length", type=int)
    parser.add_argument("--batches", type=int, help="distinct batches (cycled through)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int, help="steps of each provider per round")
    parser.add_argument("--warmup", type=int, help="untimed steps of each provider first")
    parser.add_argument("--budget-seconds", type=float, default=540.0,
                        help="start no round after this many seconds (0: no limit)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--cache-dtype", default="bf16", choices=("fp32", "bf16", "fp16", "int8"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--providers", default=",".join(PROVIDERS),
                        help="comma-separated subset of " + ",".join(PROVIDERS))
    parser.add_argument("--textbrewer-python", default=default_textbrewer_python(),
                        help="the Python of TextBrewer's environment (default $TEXTBREWER_PYTHON "
                             "or /work/venv-textbrewer/bin/python)")
    parser.add_argument("--output", help="the JSON file (default: benchmarks/results/<device>/"
                                         "step_vs_peers.json; --quick: a temporary file)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    args.providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = set(args.providers) - set(PROVIDERS)
    if unknown:
        parser.error(f"--providers: unknown {sorted(unknown)}; expected some of {PROVIDERS}")
    for key in ("batch_size", "max_length", "batches", "rounds", "steps", "threads"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1; got {getattr(args, key)}")
    if args.warmup < 1:
        parser.error(f"--warmup must be >= 1 (the first step of each provider is not timed); "
                     f"got {args.warmup}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args.worker)
    result = run(args)
    out = args.output
    if out is None:
        from .common import device_info, device_slug
        out = (os.path.join(tempfile.gettempdir(), "step_vs_peers_quick.json") if args.quick
               else os.path.join(os.path.dirname(__file__), "results",
                                 device_slug(device_info("cpu")), "step_vs_peers.json"))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(table(result))
    for note in result["notes"]:
        print("note:", note)
    print("# wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
