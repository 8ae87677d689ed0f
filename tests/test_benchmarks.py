"""The benchmark harness in its CPU smoke mode: cases run, ratios and tables come out."""

import pytest
import torch

from conftest import needs_triton

import tinybert_fast as tbf
from benchmarks import bench_attention_mse, bench_hidden_mse, bench_soft_ce, common, report


@needs_triton
def test_harness_rows_ratios_and_tables():
    tbf.set_backend("triton")
    rows = []
    for suite in (bench_attention_mse, bench_hidden_mse, bench_soft_ce):
        rows += common.run_case(suite.cases(quick=True)[0], "cpu", ("eager", "fused"),
                                ("fwd", "full"), quick=True)
    common.add_ratios(rows)
    assert not [r for r in rows if "error" in r]
    assert {r["op"] for r in rows} == {"attention", "hidden", "soft_ce"}
    for r in rows:
        assert r["median_ms"] > 0 and r["p20_ms"] <= r["p80_ms"]
        if r["provider"] == "eager":
            assert r["speedup_vs_eager"] == 1.0
    assert "attention" in common.format_table(rows)
    doc = {"device_info": {"device": "test", "torch": torch.__version__, "triton": "x",
                           "git_commit": "0" * 40}, "results": rows}
    table = report.ops_table(doc)
    assert table.count("\n| ") == sum(r["mode"] == "full" for r in rows) + 1
