"""The teacher-cache extension's just-in-time build (tinybert_fast._extension).

`import tinybert_fast` builds and loads nothing; the cache folder is named after torch, CUDA,
Python, the flavour and a hash of the sources (a changed source gets a fresh folder, a copy of
the sources elsewhere the same one); a warm cache loads without compiling; processes that build
one folder at once compile once and all load it, also past the lock file a killed torch build
leaves; a failed build is a warning, HAS_EXTENSION False and a RuntimeError from the cache API
that says how to fix it (an error with TBF_REQUIRE_EXTENSION=1); `tinybert-fast build-extension`
reports.  The build tests compile a one-function stand-in for csrc/ (about a second), not the
real extension, which CI builds ahead of the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tinybert_fast import _extension as E

from conftest import require_cache_extension  # noqa: E402

# A stand-in for csrc/: compiles in about a second, registers no ops.
TINY_SOURCE = 'extern "C" int tbf_tiny_extension(void) { return 42; }\n'


def clean_env(**extra) -> dict:
    """This environment for a subprocess, CPU-only builds (no GPU, no FORCE_CUDA), plus extra
    (a None value removes the variable)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    for k in ("FORCE_CUDA", "TORCH_CUDA_ARCH_LIST", "TBF_NO_EXTENSION", "TBF_REQUIRE_EXTENSION"):
        env.pop(k, None)
    for k, v in extra.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = str(v)
    return env


def run_python(code: str, env: dict | None = None, timeout: float = 300) -> str:
    """Run code in a fresh interpreter; its stdout (AssertionError with stderr if it fails)."""
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                         text=True, timeout=timeout, env=env,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert run.returncode == 0, f"exit status {run.returncode}\n{run.stdout}\n{run.stderr}"
    return run.stdout


@pytest.fixture
def cpu_builds(monkeypatch):
    """Plans made in this process are CPU-only, as in clean_env()'s subprocesses."""
    for k in ("FORCE_CUDA", "TORCH_CUDA_ARCH_LIST"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def tiny_sources(folder: Path, text: str = TINY_SOURCE) -> Path:
    (folder / "cuda").mkdir(parents=True, exist_ok=True)
    (folder / "teacher_cache.cpp").write_text(text)
    return folder


# ------------------------------------------------------------------------------------------------
# Import, sources, cache key

def test_import_does_not_build_or_load_the_extension(tmp_path):
    # An empty extension folder: anything that built or loaded would have to compile into it.
    out = run_python('''
        import json, sys
        import torch
        import tinybert_fast as tbf
        from tinybert_fast import _extension
        loaded = [l for l in open("/proc/self/maps") if "tinybert_fast_cache" in l]
        report = {"cache_imported": "tinybert_fast.cache" in sys.modules,
                  "state": _extension.loaded_state() is not None, "mapped": bool(loaded),
                  "ops": bool(torch.ops.loaded_libraries)}
        tbf.TeacherCache, tbf.CacheWriter  # the classes: still nothing built
        from tinybert_fast import cache
        report["after_class_access"] = _extension.loaded_state() is not None
        print(json.dumps(report))
    ''', env=clean_env(TINYBERT_FAST_EXTENSION_DIR=tmp_path / "ext"))
    report = json.loads(out.strip().splitlines()[-1])
    assert report == {"cache_imported": False, "state": False, "mapped": False, "ops": False,
                      "after_class_access": False}, report
    assert not (tmp_path / "ext").exists()


def test_sources_are_found():
    src = E.source_dir()
    for name in ("teacher_cache.cpp", "teacher_cache.h", "cuda/teacher_cache_kernel.cu"):
        assert (src / name).is_file(), f"{name} missing from {src}"


def test_every_cpp_file_is_compiled(tmp_path, cpu_builds):
    # the ops and CPU path, CRC32C and the thread pool are separate translation units
    plan = E.plan_build(src=E.source_dir(), root=tmp_path)
    compiled = sorted(Path(p).name for p in plan.sources)
    assert compiled == sorted(p.name for p in E.source_dir().glob("*.cpp"))
    assert {"teacher_cache.cpp", "crc32c.cpp", "thread_pool.cpp"} <= set(compiled), compiled


def test_cache_folder_is_named_after_torch_python_flavour_and_source_hash(tmp_path):
    a = shutil.copytree(E.source_dir(), tmp_path / "a")
    b = shutil.copytree(E.source_dir(), tmp_path / "b")
    plan = E.plan_build(src=a, root=tmp_path / "root")
    cuda = f"cu{torch.version.cuda}" if torch.version.cuda else "cpu"
    tag = (f"torch{torch.__version__.split('+')[0]}-{cuda}-"
           f"cp{sys.version_info[0]}{sys.version_info[1]}")
    folder = Path(plan.folder)
    assert folder.parent == tmp_path / "root" / tag
    assert folder.name == f"{plan.flavour}-{plan.key[:16]}"
    assert plan.library == str(folder / f"tinybert_fast_cache_{plan.flavour}_{plan.key[:12]}.so")
    # the same sources elsewhere share the build; a changed header gets a fresh folder
    assert E.plan_build(src=b, root=tmp_path / "root").folder == plan.folder
    with open(b / "teacher_cache.h", "a") as f:
        f.write("// changed\n")
    changed = E.plan_build(src=b, root=tmp_path / "root")
    assert changed.key != plan.key and changed.folder != plan.folder


def test_extension_dir_setting(tmp_path, monkeypatch):
    monkeypatch.setenv(E.ENV_DIR, str(tmp_path / "x"))
    assert E.extension_root() == tmp_path / "x"
    monkeypatch.delenv(E.ENV_DIR)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert E.extension_root() == tmp_path / "xdg" / "tinybert_fast" / "extensions"


def test_cuda_flavour_rules(tmp_path, monkeypatch, cpu_builds):
    src = tiny_sources(tmp_path / "src")
    plan = E.plan_build(src=src, root=tmp_path)
    assert not plan.with_cuda and "no GPU is visible" in plan.notes[0]

    monkeypatch.setenv("FORCE_CUDA", "1")
    plan = E.plan_build(src=src, root=tmp_path)
    if torch.version.cuda is None:
        assert not plan.with_cuda and "CPU-only build" in plan.notes[0], plan.notes
    elif E.find_nvcc()[1] is None:
        assert not plan.with_cuda and "nvcc was not found" in plan.notes[0], plan.notes
    else:  # no GPU, no TORCH_CUDA_ARCH_LIST: Hopper + PTX
        assert plan.with_cuda and plan.arch_list == "9.0+PTX", plan
        assert plan.flavour == "cuda" and "-DTBF_WITH_CUDA" in plan.cxx_flags
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        other = E.plan_build(src=src, root=tmp_path)
        assert other.arch_list == "8.0;9.0" and other.key != plan.key

    monkeypatch.setattr(E, "find_nvcc", lambda: (None, None))
    plan = E.plan_build(src=src, root=tmp_path)
    assert not plan.with_cuda
    assert ("CPU-only build" if torch.version.cuda is None else "nvcc was not found") in \
        plan.notes[0]


# ------------------------------------------------------------------------------------------------
# Building: locking, warm cache, rebuild on change (on a one-function stand-in for csrc/)

BUILD_TWICE = '''
    import json, sys, time
    import torch
    from tinybert_fast import _extension as E
    real = E._compile
    def slow_compile(plan):  # long enough that the other process finds the lock taken
        time.sleep(2)
        real(plan)
    E._compile = slow_compile
    plan = E.plan_build(src=sys.argv[1], root=sys.argv[2])
    marker, compiled = E.build(plan)
    torch.ops.load_library(plan.library)
    print(json.dumps({"compiled": compiled, "library": plan.library}))
'''


def test_concurrent_cold_builds_compile_once_and_both_load(tmp_path, cpu_builds):
    src, root = tiny_sources(tmp_path / "src"), tmp_path / "root"
    plan = E.plan_build(src=src, root=root)
    # the lock file a killed torch < 2.14 build leaves behind (its mere existence blocks torch)
    os.makedirs(plan.folder)
    Path(plan.folder, "lock").touch()
    script = tmp_path / "build.py"
    script.write_text(textwrap.dedent(BUILD_TWICE))
    procs = [subprocess.Popen([sys.executable, str(script), str(src), str(root)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=clean_env()) for _ in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(r["compiled"] for r in results) == [False, True], results
    assert results[0]["library"] == results[1]["library"] == plan.library
    marker = json.loads(Path(plan.folder, E.MARKER).read_text())
    assert marker["key"] == plan.key and marker["flavour"] == "cpu"

    # warm: found without compiling; a changed source compiles into a fresh folder
    assert E.build(plan) == (marker, False)
    tiny_sources(src, TINY_SOURCE + "// changed\n")
    changed = E.plan_build(src=src, root=root)
    assert changed.folder != plan.folder
    marker2, compiled = E.build(changed)
    assert compiled and os.path.isfile(changed.library) and marker2["key"] == changed.key


def test_warm_cache_loads_without_compiling():
    require_cache_extension()  # builds it here if the cache is cold
    out = run_python('''
        import json, time
        from tinybert_fast import _extension as E
        def no_compile(plan):
            raise AssertionError("compiled although the cache is warm")
        E._compile = no_compile
        t = time.perf_counter()
        s = E.state()
        print(json.dumps({"loaded": s.loaded, "compiled": s.compiled, "error": s.error,
                          "seconds": time.perf_counter() - t,
                          "info": E.ops().build_info()}))
    ''')
    r = json.loads(out.strip().splitlines()[-1])
    assert r["loaded"] and not r["compiled"], r
    assert r["info"].startswith(f"torch {torch.__version__.split('+')[0]}"), r


# ------------------------------------------------------------------------------------------------
# A failed build; the command

BROKEN = '''
    import json, warnings
    from pathlib import Path
    from tinybert_fast import _extension as E
    E.source_dir = lambda: Path({src!r})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        import tinybert_fast as tbf
        from tinybert_fast import cache
        has = cache.HAS_EXTENSION
    report = {{"has": has, "cuda": cache.HAS_CUDA_KERNELS, "error": cache.EXTENSION_ERROR,
              "warnings": [str(x.message) for x in w if x.category is RuntimeWarning]}}
    try:
        tbf.TeacherCache.open("nowhere")
    except RuntimeError as e:
        report["open"] = str(e)
    tbf.attention_mse  # the rest of the package works
    print(json.dumps(report))
'''


def test_failed_build_is_a_warning_and_a_runtime_error_from_the_cache(tmp_path):
    src = tiny_sources(tmp_path / "src", "#error deliberately broken source\n")
    env = clean_env(TINYBERT_FAST_EXTENSION_DIR=tmp_path / "ext")
    r = json.loads(run_python(BROKEN.format(src=str(src)), env=env).strip().splitlines()[-1])
    assert r["has"] is False and r["cuda"] is False
    assert "deliberately broken source" in r["error"] and "build log:" in r["error"], r["error"]
    assert len(r["warnings"]) == 1 and "could not be built" in r["warnings"][0], r["warnings"]
    assert "tinybert-fast build-extension" in r["open"], r["open"]
    assert "deliberately broken source" in r["open"], r["open"]
    logs = list((tmp_path / "ext").glob(f"*/*/{E.BUILD_LOG}"))
    assert len(logs) == 1 and "deliberately broken source" in logs[0].read_text()
    assert not list((tmp_path / "ext").glob(f"*/*/{E.MARKER}"))


def test_failed_build_with_require_extension_is_an_error(tmp_path):
    src = tiny_sources(tmp_path / "src", "#error deliberately broken source\n")
    env = clean_env(TINYBERT_FAST_EXTENSION_DIR=tmp_path / "ext", TBF_REQUIRE_EXTENSION=1)
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(BROKEN.format(src=str(src)))],
                         capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode != 0
    assert "ExtensionError: TBF_REQUIRE_EXTENSION=1" in run.stderr, run.stderr
    assert "deliberately broken source" in run.stderr, run.stderr


def test_no_extension_setting_turns_it_off(tmp_path):
    env = clean_env(TINYBERT_FAST_EXTENSION_DIR=tmp_path / "ext", TBF_NO_EXTENSION=1)
    out = run_python('''
        import warnings
        warnings.simplefilter("error")
        from tinybert_fast import cache
        assert cache.HAS_EXTENSION is False and "TBF_NO_EXTENSION=1" in cache.EXTENSION_ERROR
        try:
            cache.build_info()
        except RuntimeError as e:
            assert "TBF_NO_EXTENSION=1" in str(e), e
        else:
            raise AssertionError("no error")
        print("ok")
    ''', env=env)
    assert out.strip() == "ok"
    assert not (tmp_path / "ext").exists()


def test_build_extension_command_reports(caplog):
    require_cache_extension()
    from tinybert_fast import cli
    with caplog.at_level("INFO", logger="tinybert_fast"):
        assert cli.main(["build-extension"]) == 0
    text = caplog.text
    assert "teacher-cache extension: torch" in text and E.state().plan.library in text, text
    rc = cli.main(["build-extension", "--cuda"])
    assert rc == (0 if E.state().cuda_kernels else 1)
