"""benchmarks/bench_step_vs_peers.py: a --quick run (tiny random MPNet models, MRPC sentences)
writes the documented JSON; the three providers ran the same batches in the same order, and
TextBrewer, configured with the same losses, computes our loss on the first batch (converted to
its normalisation).  Skipped without TextBrewer's environment ($TEXTBREWER_PYTHON, default
/work/venv-textbrewer/bin/python, with textbrewer importable there)."""

import json
import os
import subprocess

import pytest
import torch

from conftest import require_cache_extension

from benchmarks import bench_step_vs_peers as bench

MRPC = os.path.join(bench.GLUE, "MRPC")
pytestmark = pytest.mark.skipif(not os.path.isfile(os.path.join(MRPC, "train.tsv")),
                                reason=f"MRPC not found at {MRPC}")
require_cache_extension()


def _textbrewer_python() -> str:
    python = bench.default_textbrewer_python()
    if not os.path.isfile(python):
        pytest.skip(f"TextBrewer's environment is absent: no {python} (set TEXTBREWER_PYTHON; "
                    f"the benchmark's docstring says how to make it)")
    found = subprocess.run([python, "-c", "import textbrewer"], capture_output=True, text=True)
    if found.returncode:
        pytest.skip(f"textbrewer does not import in {python}: {found.stderr.strip()[-300:]}")
    return python


def test_a_quick_run_times_the_three_providers_on_the_same_batches(tmp_path):
    python = _textbrewer_python()
    out = tmp_path / "step_vs_peers.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--quick", "--rounds", "2", "--steps", "2", "--batches", "3",
                           "--textbrewer-python", python, "--output", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    result = json.loads(out.read_text())
    assert {"device", "versions", "config", "providers", "ratios", "cache_build_seconds",
            "notes", "loss_check"} <= set(result)
    assert not [n for n in result["notes"] if "did not run" in n or "stopped after" in n]
    providers = result["providers"]
    assert set(providers) == set(bench.PROVIDERS)
    for name, p in providers.items():
        assert p["steps"] == 2 * 2, name
        assert 0 < p["p20"] <= p["examples_per_second_median"] <= p["p80"], name
        assert p["how"], name
    # the same batches, in the same order, for every provider (digests of their input ids)
    assert len({p["batch_sequence"] for p in providers.values()}) == 1
    assert set(result["ratios"]) == {"cache/live", "cache/textbrewer", "live/textbrewer"}
    assert result["ratios"]["cache/live"] == pytest.approx(
        providers["cache"]["examples_per_second_median"]
        / providers["live"]["examples_per_second_median"])
    assert result["cache_build_seconds"] > 0
    assert result["versions"]["textbrewer_environment"]["textbrewer"]
    # batches padded to their longest (so the normalisations differ: the check converts them)
    assert min(result["config"]["padded_lengths"]) < result["config"]["max_length"]
    check = result["loss_check"]
    assert check["textbrewer_relative_difference"] < 1e-5
    # the cache (bf16) gives the live teacher's loss to bf16 precision
    assert check["cache"]["total"] == pytest.approx(check["live"]["total"], rel=1e-2)


def test_unknown_providers_and_empty_budgets_are_refused():
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--providers", "cache,deepspeed"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--quick", "--steps", "0"])
