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


# --- the static compile (benchmarks/static.py) and the carried Triton cache --------------------

import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import static, triton_cache

ROOT = Path(__file__).resolve().parent.parent


def test_static_occupancy_model():
    # sm_90: 64K registers, 64 warps, 228 KB of shared memory per SM
    arch = static.ARCHS["sm_90"]
    # 128 registers x 8 warps: 128 * 32 = 4096 registers a warp, 16 warps fit, 2 blocks
    assert arch.blocks_per_sm(128, 0, 8) == {"blocks_per_sm": 2, "warps_per_sm": 16,
                                            "limited_by": "regs", "smem_fits": True}
    # 100 KB of shared memory: 2 blocks of (100 + 1) KB in 228 KB
    got = arch.blocks_per_sm(32, 100 * 1024, 4)
    assert (got["blocks_per_sm"], got["limited_by"]) == (2, "smem")
    # more shared memory than one block may have on an A100 (163 KB), not on an H100 (227 KB)
    assert not static.ARCHS["sm_80"].blocks_per_sm(64, 200 * 1024, 4)["smem_fits"]
    assert static.ARCHS["sm_90"].blocks_per_sm(64, 200 * 1024, 4)["smem_fits"]


def test_static_ptx_load_widths():
    ptx = """
    ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    @%p1 ld.global.b16 { %rs1 }, [ %rd2 + 0 ];
    ld.global.L1::evict_last.v2.b32 { %r5, %r6 }, [ %rd3 + 0 ];
    ld.global.v4.b32 { %r7, %r8, %r9, %r10 }, [ %rd4 + 0 ];
    """
    assert static._ptx_loads(ptx) == {"v1": 1, "v2": 1, "v4": 2, "v8": 0}


def test_hidden_k_div_marks_what_triton_cannot():
    from tinybert_fast.kernels import hidden_cosine, hidden_mse
    # TinyBERT4's width: 312 = 8 * 39, rows of 624 bytes in bf16: 16-byte loads
    x, w = torch.empty(5, 512, 312), torch.empty(768, 312)
    for k_div in (hidden_mse.k_div, hidden_cosine.k_div):
        assert k_div(312, x, w) == 8
        assert k_div(768, torch.empty(1, 4, 768), torch.empty(30, 768)) == 16
        assert k_div(26, torch.empty(2, 7, 26), torch.empty(50, 26)) == 2
        # a row stride that is odd (a column slice of a wider tensor) caps the hint at 1
        assert k_div(312, torch.empty(2, 7, 313)[..., :312], w) == 1


def _static_env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the static compile needs Triton's compiler, not its
    return env                         # interpreter


def test_static_compiles_without_spills(tmp_path):
    """The AOT compile for sm_90 of the kernels whose spills and scalar loads were fixed against
    the static tables: the Gram backward at TinyBERT4 <- BERT-base (d 26 / 64, both gradients) and
    the fused hidden MSE at K = 312, compiled by ptxas; no spill, K = 312 pipelined."""
    only = ("attention_qk\\[gram\\] B32H12L128d26-64 bf16/bf16 mask=bool hf=True|"
            "hidden_mse M512K312N768 bf16 fp32_matmul=highest residual=True tm=False")
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.static", "--target", "sm_90", "--only", only,
         "--out", str(tmp_path)], cwd=ROOT, env=_static_env(), capture_output=True, text=True,
        timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = json.loads((tmp_path / "sm_90.json").read_text())
    s = table["summary"]
    assert (s["compile_errors"], s["launcher_failures"], s["with_spills"]) == (0, 0, 0)
    rows = {(r["kernel"], json.dumps(r["constexprs"], sort_keys=True)): r for r in table["kernels"]}
    gram_bwd = [r for (k, _), r in rows.items() if k == "_gram_bwd_kernel"]
    assert {(r["constexprs"]["NEED_1"], r["constexprs"]["NEED_2"]) for r in gram_bwd} >= {
        (True, True)}
    hidden = [r for (k, _), r in rows.items() if k == "_hidden_mse_fwd_kernel"]
    assert hidden and all(r["constexprs"]["K_DIV"] == 8 for r in hidden)
    for r in gram_bwd + hidden:
        assert r["registers"] and r["spill_stores"] == 0 and r["compile_s"] < static.MAX_COMPILE_S
        assert r["ptx"]["cp_async"] > 0, r  # the K loop is pipelined through shared memory
    assert "_gram_bwd_kernel" in table["config_notes"]


def _fake_entry(cache: Path, key: str, kernel: str, arch: int = 90) -> None:
    """A Triton cache entry as Triton writes it: a group file listing its files by absolute path."""
    entry = cache / key
    entry.mkdir(parents=True)
    files = {}
    for suffix, data in ((".cubin", b"\x7fELF" + key.encode()), (".ptx", b"// ptx"),
                         (".llir", b"; llir"),
                         (".json", json.dumps({"name": kernel,
                                               "target": {"backend": "cuda", "arch": arch,
                                                          "warp_size": 32}}).encode())):
        (entry / f"{kernel}{suffix}").write_bytes(data)
        files[f"{kernel}{suffix}"] = str(entry / f"{kernel}{suffix}")
    (entry / f"__grp__{kernel}.json").write_text(json.dumps({"child_paths": files}))


def test_triton_cache_pack_unpack_count(tmp_path):
    build = tmp_path / "build"
    _fake_entry(build, "AAAA", "_gram_bwd_kernel")
    _fake_entry(build, "BBBB", "_soft_ce_fwd_kernel")
    archive = tmp_path / "cache.tar.xz"
    manifest = triton_cache.pack(build, archive, "test")
    assert manifest["entries"] == 2 and manifest["targets"] == ["cuda:90"]
    assert manifest["kernel_sources_sha256"] == triton_cache.sources_sha256()
    assert triton_cache.compare(triton_cache.read_manifest(archive), on_device=False) == []

    # on the device: another folder; every group must point there, to the packed files only
    cache = tmp_path / "elsewhere"
    triton_cache.unpack(archive, cache)
    for grp in cache.glob("*/__grp__*.json"):
        paths = json.loads(grp.read_text())["child_paths"]
        assert sorted(Path(p).suffix for p in paths.values()) == [".cubin", ".json"]
        assert all(Path(p).parent == grp.parent and Path(p).exists() for p in paths.values())
    assert not list(cache.glob("*/*.ptx"))  # what a launch does not read stays behind

    before = triton_cache.snapshot(cache)  # cubins written from now on count as compiles
    # a lookup that missed recompiles into a carried key (same folder) or under a new key
    (cache / "AAAA" / "_gram_bwd_kernel.cubin").write_bytes(b"\x7fELF again")
    _fake_entry(cache, "CCCC", "triton_poi_fused_add_0")
    (cache / "DDDD").mkdir()
    (cache / "DDDD" / "__triton_launcher.cpython-312-x86_64-linux-gnu.so").write_bytes(b"so")
    report = triton_cache.since(cache, before)
    assert report == {"package_kernel_compiles": ["_gram_bwd_kernel"],
                      "other_kernel_compiles": 1, "launcher_builds": 1, "cache_kernels": 3}


def test_triton_cache_check_sees_changed_kernels(tmp_path, monkeypatch):
    build = tmp_path / "build"
    _fake_entry(build, "AAAA", "_gram_bwd_kernel")
    archive = tmp_path / "cache.tar.xz"
    triton_cache.pack(build, archive)
    monkeypatch.setattr(triton_cache, "sources_sha256", lambda: "0" * 64)
    bad = triton_cache.compare(triton_cache.read_manifest(archive), on_device=False)
    assert len(bad) == 1 and "kernels changed" in bad[0]
    assert triton_cache.main(["check", str(tmp_path / "missing.tar.xz")]) == 1
