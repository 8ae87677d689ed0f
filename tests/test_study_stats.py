"""Paired comparisons of study cells (tinybert_fast.study_stats): the observed difference is the
task's score from scikit-learn, each bootstrap replicate's score is too, and the test tells a
real difference from none."""

import numpy as np
import pytest

from tinybert_fast import data, glue
from tinybert_fast.study_stats import _scores, paired_comparison, paired_with_baseline


def _runs(rng, labels, accuracy, seeds=(1, 2, 3)):
    """{seed: (predictions, labels)}: each prediction right with probability `accuracy`."""
    out = {}
    for s in seeds:
        right = rng.random(len(labels)) < accuracy
        out[s] = (np.where(right, labels, 1 - labels).tolist(), labels.tolist())
    return out


@pytest.mark.parametrize("task", ["sst2", "mrpc", "cola"])
def test_delta_is_the_mean_difference_of_sklearn_scores(task):
    rng = np.random.default_rng(0)
    t = glue.get_task(task)
    labels = (rng.random(300) < 0.65).astype(int)
    cell, base = _runs(rng, labels, 0.85), _runs(rng, labels, 0.8)
    got = paired_comparison(t, cell, base, replicates=200)
    want = np.mean([data.compute_metrics(t, cell[s][0], labels)["score"]
                    - data.compute_metrics(t, base[s][0], labels)["score"] for s in (1, 2, 3)])
    assert got["delta"] == pytest.approx(want, abs=1e-12)
    assert got["seeds"] == [1, 2, 3] and got["dev_examples"] == 300
    # a replicate's score equals scikit-learn's on the same resampled examples
    idx = rng.integers(0, 300, size=(5, 300))
    pred = np.asarray(cell[1][0])[idx]
    y = labels[idx]
    for r in range(5):
        assert _scores(t, (pred == y)[r:r + 1], pred[r:r + 1], y[r:r + 1])[0] == pytest.approx(
            data.compute_metrics(t, pred[r], y[r])["score"], abs=1e-12)


def test_the_test_tells_a_real_difference_from_none():
    rng = np.random.default_rng(1)
    t = glue.get_task("cola")
    labels = (rng.random(1000) < 0.7).astype(int)
    base = _runs(rng, labels, 0.75)
    same = paired_comparison(t, base, base, replicates=500)
    assert same["delta"] == 0 and same["ci_low"] == same["ci_high"] == 0 and same["p"] == 1
    # fixing 80 of the baseline's errors on each seed: a clear gain
    better = {}
    for s, (pred, y) in base.items():
        pred = np.asarray(pred).copy()
        wrong = np.flatnonzero(pred != labels)[:80]
        pred[wrong] = labels[wrong]
        better[s] = (pred.tolist(), y)
    gain = paired_comparison(t, better, base, replicates=500)
    assert gain["delta"] > 0 and gain["ci_low"] > 0 and gain["p"] < 0.01
    # flipping 40 right and 40 wrong predictions: no net change, no significance
    shuffled = {}
    for s, (pred, y) in base.items():
        pred = np.asarray(pred).copy()
        flip = np.concatenate([np.flatnonzero(pred != labels)[:40],
                               np.flatnonzero(pred == labels)[:40]])
        pred[flip] = 1 - pred[flip]
        shuffled[s] = (pred.tolist(), y)
    null = paired_comparison(t, shuffled, base, replicates=500)
    assert null["ci_low"] < 0 < null["ci_high"] and null["p"] > 0.05


def test_runs_on_other_examples_and_regression_tasks():
    rng = np.random.default_rng(2)
    labels = (rng.random(50) < 0.5).astype(int)
    base = _runs(rng, labels, 0.8, seeds=(1, 2))
    other = {1: (base[1][0], (1 - labels).tolist())}
    with pytest.raises(ValueError, match="seed-1 run was evaluated on other dev examples"):
        paired_comparison(glue.get_task("sst2"), other, base)
    assert paired_comparison(glue.get_task("sst2"), {3: base[1]}, base) is None  # no common seed
    by_cell = {"a": {s: {"dev": v} for s, v in base.items()}, "b": {1: {"dev": base[1]}}}
    rows = paired_with_baseline("sst2", by_cell, "a")
    assert [(r["cell"], r["split"], r["seeds"], r["delta"]) for r in rows] == [
        ("b", "dev", [1], 0.0)]
    assert paired_with_baseline("stsb", by_cell, "a") == []
    assert paired_with_baseline("sst2", by_cell, "missing") == []


def test_the_detectable_difference_is_found_four_times_in_five():
    """`detectable` is the power the dev set gives: a cell better than the baseline by about that
    much on fresh data comes out at p < 0.05 in about 80% of repeats, one a third of it rarely."""
    t = glue.get_task("sst2")
    n = 800
    found = {}
    for share in (1.0, 1 / 3):
        hits = 0
        for repeat in range(40):
            rng = np.random.default_rng(100 + repeat)
            labels = (rng.random(n) < 0.5).astype(int)
            base = _runs(rng, labels, 0.80, seeds=(1,))
            probe = paired_comparison(t, base, _runs(rng, labels, 0.80, seeds=(1,)),
                                      replicates=300)
            gain = share * probe["detectable"]
            cell = _runs(rng, labels, 0.80 + gain, seeds=(1,))
            hits += paired_comparison(t, cell, base, replicates=300)["p"] < 0.05
        found[share] = hits / 40
    assert 0.55 <= found[1.0] <= 0.97 and found[1 / 3] <= 0.35, found
