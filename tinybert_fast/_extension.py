"""The teacher cache's C++/CUDA extension (csrc/), compiled just in time on first use.

The package installs without compiling anything, so it needs no torch at build time and installs
beside whichever supported torch is there.  The first use of the teacher cache (TeacherCache,
CacheWriter, tinybert_fast.cache.HAS_EXTENSION, ...) compiles csrc/ against the running torch
with ninja through `torch.utils.cpp_extension.load` (the DeepSpeed op-builder pattern), into a
folder of the user's cache named after everything the binary depends on:

    $TINYBERT_FAST_EXTENSION_DIR          default $XDG_CACHE_HOME/tinybert_fast/extensions,
                                          i.e. ~/.cache/tinybert_fast/extensions
      torch2.14.1-cu13.0-cp311/           torch release, the CUDA version torch was built with
                                          ("cpu" for a CPU-only torch), the CPython version
        cuda-3f0c9a1e2b7d4c55/            flavour ("cuda" | "cpu") and a hash of the sources,
                                          flags, CUDA arch list, nvcc version and torch build
          tinybert_fast_cache_cuda_3f0c9a1e2b7d.so
          build.json                      written last: the build is complete (what, how long)
          build.log                       the compiler's output when a build failed
          build.ninja, *.o                torch's build files
          tbf-build.lock                  held (flock) while building

A process that finds build.json loads the library without compiling or running ninja.  Builds
of one folder are serialised by an flock on tbf-build.lock (the kernel releases it if the
builder dies, unlike the lock file of torch before 2.14, whose leftover this module removes
while holding its own lock); whoever takes the lock checks build.json again, so processes that
start cold together (DDP ranks, pytest-xdist workers) build once and all load the result.  A
source change gives another hash, hence a fresh folder.

Flavour (xformers' rules): the CUDA kernels (csrc/cuda/*.cu) are built when torch is a CUDA
build, nvcc is found (CUDA_HOME, CUDA_PATH, /usr/local/cuda, or the toolkit above the nvcc on
PATH) and a GPU is visible or FORCE_CUDA=1 or TORCH_CUDA_ARCH_LIST is set; else the CPU-only
library.  Arch list: TORCH_CUDA_ARCH_LIST, else the visible GPUs' (the newest with PTX), else
"9.0+PTX".  A CUDA build compiles and links without a GPU (CI does).

Settings (environment): TBF_NO_EXTENSION=1 turns the extension off; TBF_REQUIRE_EXTENSION=1
makes a failed build an error instead of a warning (CI); TINYBERT_FAST_EXTENSION_DIR; FORCE_CUDA,
TORCH_CUDA_ARCH_LIST, CUDA_HOME / CUDA_PATH; MAX_JOBS (ninja's parallel jobs) and CXX are read by
torch.utils.cpp_extension.  `tinybert-fast build-extension` builds ahead of time and reports.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import fcntl
import glob
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from ._io import atomic_write

logger = logging.getLogger(__name__)

NAMESPACE = "tinybert_fast_cache"  # TORCH_LIBRARY(tinybert_fast_cache, m) in csrc/
ENV_DIR = "TINYBERT_FAST_EXTENSION_DIR"
MARKER = "build.json"
BUILD_LOG = "build.log"
LOCK = "tbf-build.lock"
DEFAULT_CUDA_ARCH_LIST = "9.0+PTX"  # no GPU to ask: Hopper, plus PTX that newer GPUs JIT
# Bump when the way the library is built changes in a way the hashed inputs below do not show.
RECIPE = 1

_PACKAGE_DIR = Path(__file__).resolve().parent
_SOURCE_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")
_CXX_FLAGS = ("-O3", "-Wall", "-Wno-unknown-pragmas")
_NVCC_FLAGS = ("-O3", "-DTBF_WITH_CUDA", "-lineinfo")
_HOW_TO_FIX = (
    "a CPU build needs a C++17 compiler (g++ or clang++ on PATH, or CXX) and ninja (a dependency "
    "of tinybert-fast: `pip install ninja`); the CUDA kernels also need nvcc (CUDA_HOME).  "
    "`tinybert-fast build-extension` builds it and reports what failed (--force compiles it "
    "again); TBF_NO_EXTENSION=1 turns it off.  See README, 'Building the extension'")


class ExtensionError(RuntimeError):
    """The teacher-cache extension could not be built or loaded."""


def truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


# ------------------------------------------------------------------------------------------------
# What to build, and where

@dataclasses.dataclass(frozen=True)
class BuildPlan:
    """One build of the extension: its flavour, inputs, and the cache folder it lives in."""
    with_cuda: bool
    notes: tuple[str, ...]        # why the CUDA kernels are (not) built
    source_dir: str
    sources: tuple[str, ...]      # compiled files (the headers are hashed too)
    include_dirs: tuple[str, ...]
    cxx_flags: tuple[str, ...]
    nvcc_flags: tuple[str, ...]
    cuda_home: str | None
    nvcc_version: str | None
    arch_list: str | None         # TORCH_CUDA_ARCH_LIST of a CUDA build
    key: str                      # sha256 of everything the binary depends on
    folder: str

    @property
    def flavour(self) -> str:
        return "cuda" if self.with_cuda else "cpu"

    @property
    def name(self) -> str:
        # One name per build: torch's loader renames (name_v1) a second build of a name in one
        # process, which would not be the library this module looks for.
        return f"{NAMESPACE}_{self.flavour}_{self.key[:12]}"

    @property
    def library(self) -> str:
        return os.path.join(self.folder, self.name + ".so")


def extension_root() -> Path:
    """The folder holding the built extensions: $TINYBERT_FAST_EXTENSION_DIR, else
    $XDG_CACHE_HOME/tinybert_fast/extensions (~/.cache/tinybert_fast/extensions)."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "tinybert_fast" / "extensions"


def source_dir() -> Path:
    """csrc/: shipped inside the package (tinybert_fast/csrc, a regular install) or beside it
    (the source tree, an editable install)."""
    candidates = (_PACKAGE_DIR / "csrc", _PACKAGE_DIR.parent / "csrc")
    for d in candidates:
        if (d / "teacher_cache.cpp").is_file():
            return d
    raise ExtensionError(f"the extension's sources (csrc/teacher_cache.cpp) are in none of "
                         f"{', '.join(map(str, candidates))}: reinstall tinybert-fast")


def torch_tag() -> str:
    """The first level of the cache: torch release, its CUDA version (or cpu), CPython."""
    release = torch.__version__.split("+")[0]
    cuda = f"cu{torch.version.cuda}" if torch.version.cuda else "cpu"
    return f"torch{release}-{cuda}-cp{sys.version_info[0]}{sys.version_info[1]}"


def find_nvcc() -> tuple[str | None, str | None]:
    """(CUDA_HOME, nvcc) or (None, None): the first of CUDA_HOME, CUDA_PATH, /usr/local/cuda
    and the folder above the nvcc on PATH that holds a CUDA toolkit (bin/nvcc and
    include/cuda_runtime.h; an nvcc on PATH may be a wrapper script elsewhere)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if (home and os.path.exists(os.path.join(home, "bin", "nvcc"))
                and os.path.exists(os.path.join(home, "include", "cuda_runtime.h"))):
            return home, os.path.join(home, "bin", "nvcc")
    return None, None


def nvidia_wheel_includes() -> list[str]:
    """Include folders of the nvidia-* wheels a CUDA build of torch depends on: torch's headers
    include cusparse.h etc., which a bare nvcc install may lack."""
    site = os.path.dirname(os.path.dirname(torch.__file__))
    found = glob.glob(os.path.join(site, "nvidia", "*", "include", "cusparse.h"))
    return sorted({os.path.dirname(p) for p in found})


def _gpu_arch_list() -> str:
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{a}.{b}" for a, b in caps) + "+PTX"


def _hash_sources(src: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(q for q in src.rglob("*") if q.suffix in _SOURCE_SUFFIXES and q.is_file()):
        h.update(p.relative_to(src).as_posix().encode() + b"\0")
        h.update(p.read_bytes() + b"\0")
    return h.hexdigest()


def plan_build(src: str | os.PathLike | None = None,
               root: str | os.PathLike | None = None) -> BuildPlan:
    """What a build here would be (flavour, flags, cache folder); builds nothing."""
    src = Path(src) if src is not None else source_dir()
    root = Path(root) if root is not None else extension_root()
    gpu = torch.cuda.is_available()
    env_arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    requested = [why for why, on in (("a GPU is visible", gpu),
                                     ("FORCE_CUDA=1", truthy("FORCE_CUDA")),
                                     (f"TORCH_CUDA_ARCH_LIST={env_arch}", bool(env_arch))) if on]
    cuda_home, nvcc = find_nvcc()
    with_cuda, notes = False, []
    if not requested:
        notes.append("CPU-only: no GPU is visible (FORCE_CUDA=1 or TORCH_CUDA_ARCH_LIST, with "
                     "nvcc, builds the CUDA kernels without one)")
    elif torch.version.cuda is None:
        notes.append(f"CPU-only: CUDA was asked for ({', '.join(requested)}) but torch "
                     f"{torch.__version__} is a CPU-only build")
    elif nvcc is None:
        notes.append(f"CPU-only: CUDA was asked for ({', '.join(requested)}) but nvcc was not "
                     f"found (set CUDA_HOME); cache.fetch(device='cuda') then unpacks on the CPU "
                     f"and copies")
    else:
        with_cuda = True
        notes.append(f"CUDA kernels: {', '.join(requested)}; nvcc {nvcc}")

    # Every .cpp of csrc/ (the ops and CPU path, crc32c, the thread pool); the headers are hashed
    # into the key below with the sources.
    sources = sorted(src.glob("*.cpp"))
    includes = [str(src)]
    cxx = list(_CXX_FLAGS)
    nvcc_flags: list[str] = []
    arch = nvcc_version = None
    if with_cuda:
        arch = env_arch or (_gpu_arch_list() if gpu else DEFAULT_CUDA_ARCH_LIST)
        sources += sorted((src / "cuda").glob("*.cu"))
        includes += nvidia_wheel_includes()
        cxx.append("-DTBF_WITH_CUDA")
        nvcc_flags = list(_NVCC_FLAGS)
        nvcc_version = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                                      timeout=120).stdout.strip().splitlines()[-1:]
        nvcc_version = nvcc_version[0] if nvcc_version else "unknown"
    identity = {
        "recipe": RECIPE, "torch": torch.__version__, "torch_git": torch.version.git_version,
        "torch_cuda": torch.version.cuda, "python": list(sys.version_info[:2]),
        "with_cuda": with_cuda, "arch_list": arch, "nvcc": nvcc_version, "cxx_flags": cxx,
        "nvcc_flags": nvcc_flags, "sources": _hash_sources(src)}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    folder = root / torch_tag() / f"{'cuda' if with_cuda else 'cpu'}-{key[:16]}"
    return BuildPlan(with_cuda, tuple(notes), str(src), tuple(map(str, sources)), tuple(includes),
                     tuple(cxx), tuple(nvcc_flags), cuda_home if with_cuda else None,
                     nvcc_version, arch, key, str(folder))


# ------------------------------------------------------------------------------------------------
# Building

def _read_marker(plan: BuildPlan) -> dict | None:
    """build.json of a complete build of this plan, else None."""
    try:
        with open(os.path.join(plan.folder, MARKER), encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return None
    if marker.get("key") != plan.key or not os.path.isfile(plan.library):
        return None
    return marker


@contextlib.contextmanager
def _folder_lock(folder: str):
    """An exclusive flock on folder/tbf-build.lock (released by the kernel if we die)."""
    with open(os.path.join(folder, LOCK), "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process that is building the teacher-cache "
                        "extension in %s", folder)
            start = time.perf_counter()
            fcntl.flock(f, fcntl.LOCK_EX)
            logger.info("waited %.0f s for the other build", time.perf_counter() - start)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@contextlib.contextmanager
def _build_environment(plan: BuildPlan):
    """The environment torch.utils.cpp_extension reads, for the length of the build: ninja and
    the compilers on PATH (a venv's python may run without its bin/ on PATH), CUDA_HOME (read
    when torch.utils.cpp_extension is first imported) and TORCH_CUDA_ARCH_LIST."""
    saved = {k: os.environ.get(k) for k in ("PATH", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST")}
    path = [os.path.dirname(sys.executable)]
    with contextlib.suppress(ImportError, AttributeError):
        import ninja
        path.insert(0, ninja.BIN_DIR)
    os.environ["PATH"] = os.pathsep.join(path + [os.environ.get("PATH", "")])
    if plan.with_cuda:
        os.environ["CUDA_HOME"] = plan.cuda_home
        os.environ["TORCH_CUDA_ARCH_LIST"] = plan.arch_list
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _compile(plan: BuildPlan) -> None:
    """torch.utils.cpp_extension.load into plan.folder (also loads the library)."""
    try:
        from torch.utils import cpp_extension
    except ImportError as exc:  # it imports setuptools, which a bare venv lacks
        raise ExtensionError(f"torch.utils.cpp_extension cannot be imported ({exc}): "
                             f"`pip install setuptools ninja`") from exc
    if plan.with_cuda and cpp_extension.CUDA_HOME != plan.cuda_home:
        # Read from the environment when torch.utils.cpp_extension was first imported, which
        # may have been before _build_environment set it.
        cpp_extension.CUDA_HOME = plan.cuda_home
    if not cpp_extension.is_ninja_available():
        raise ExtensionError("ninja was not found (it is a dependency of tinybert-fast: "
                             "`pip install ninja`)")
    cpp_extension.load(
        name=plan.name, sources=list(plan.sources), extra_cflags=list(plan.cxx_flags),
        extra_cuda_cflags=list(plan.nvcc_flags), extra_include_paths=list(plan.include_dirs),
        build_directory=plan.folder, with_cuda=plan.with_cuda, is_python_module=False,
        verbose=False)


def build(plan: BuildPlan, force: bool = False) -> tuple[dict, bool]:
    """Make plan.library exist: (build.json, whether this call compiled it).  Waits for a
    concurrent build of the same folder instead of compiling twice; `force` compiles again."""
    marker = None if force else _read_marker(plan)
    if marker is not None:
        return marker, False
    try:
        os.makedirs(plan.folder, exist_ok=True)
    except OSError as exc:
        raise ExtensionError(f"cannot create the extension folder {plan.folder} ({exc}): set "
                             f"{ENV_DIR} to a writable folder") from exc
    with _folder_lock(plan.folder):
        marker = None if force else _read_marker(plan)
        if marker is not None:  # another process built it while we waited
            return marker, False
        for name in (MARKER, BUILD_LOG, "lock"):  # "lock": a dead builder's torch FileBaton
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(plan.folder, name))
        if force:
            for p in glob.glob(os.path.join(plan.folder, "*.o")) + [plan.library]:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(p)
        logger.info("compiling the teacher-cache extension (%s%s) for torch %s into %s; this "
                    "takes a while once (CPU-only about half a minute, CUDA a few minutes), "
                    "later runs load it from there", plan.flavour,
                    f", TORCH_CUDA_ARCH_LIST={plan.arch_list}" if plan.with_cuda else "",
                    torch.__version__, plan.folder)
        for note in plan.notes:
            logger.info("%s", note)
        start = time.perf_counter()
        try:
            with _build_environment(plan):
                _compile(plan)
        except Exception as exc:
            seconds = time.perf_counter() - start
            with open(os.path.join(plan.folder, BUILD_LOG), "w", encoding="utf-8") as f:
                f.write(f"{type(exc).__name__} after {seconds:.1f} s:\n{exc}\n")
            logger.error("building the teacher-cache extension failed after %.0f s:\n%s",
                         seconds, exc)
            raise
        seconds = time.perf_counter() - start
        marker = {
            "key": plan.key, "library": os.path.basename(plan.library), "flavour": plan.flavour,
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "python": sys.version.split()[0], "arch_list": plan.arch_list,
            "nvcc": plan.nvcc_version, "sources": plan.source_dir, "notes": list(plan.notes),
            "build_seconds": round(seconds, 1),
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        atomic_write(os.path.join(plan.folder, MARKER), json.dumps(marker, indent=2) + "\n")
        logger.info("compiled the teacher-cache extension (%s) in %.0f s: %s", plan.flavour,
                    seconds, plan.library)
        return marker, True


# ------------------------------------------------------------------------------------------------
# The process-wide state: built and loaded once, on first use

@dataclasses.dataclass(frozen=True)
class Extension:
    """What the first use found.  `error` says why `loaded` is False."""
    loaded: bool
    cuda_kernels: bool
    error: str | None = None
    plan: BuildPlan | None = None
    marker: dict | None = None
    compiled: bool = False        # compiled by this process (else loaded from the cache)
    seconds: float = 0.0          # the build and load, or the load
    disabled: bool = False        # TBF_NO_EXTENSION=1


_STATE: Extension | None = None
_STATE_LOCK = threading.Lock()


def loaded_state() -> Extension | None:
    """The state if the extension was already built/loaded (or failed) here, else None."""
    return _STATE


def state(force: bool = False) -> Extension:
    """Build (unless cached) and load the extension, once per process (`force`: compile again
    even if the cache holds a build; only the first call of a process can).

    A failure is a RuntimeWarning (once) and Extension(loaded=False, error=...), unless
    TBF_REQUIRE_EXTENSION=1, where every call raises ExtensionError.  TBF_NO_EXTENSION=1: not
    loaded, no warning.
    """
    global _STATE
    with _STATE_LOCK:
        first = _STATE is None
        if first:
            _STATE = _load(force)
        elif force:
            raise ExtensionError("the extension is already loaded in this process: build it "
                                 "again (force) in a new one, e.g. `tinybert-fast "
                                 "build-extension --force`")
        s = _STATE
    if not s.loaded and not s.disabled:
        if truthy("TBF_REQUIRE_EXTENSION"):
            raise ExtensionError(f"TBF_REQUIRE_EXTENSION=1 and the teacher-cache extension could "
                                 f"not be built or loaded: {s.error}\n{_HOW_TO_FIX}")
        if first:
            warnings.warn(
                f"tinybert_fast: the teacher-cache C++ extension could not be built or loaded: "
                f"{s.error}\nTeacherCache is unavailable (tinybert_fast.cache.HAS_EXTENSION is "
                f"False); the rest of tinybert_fast works.  {_HOW_TO_FIX}", RuntimeWarning,
                stacklevel=3)
    return s


def _summary(exc: BaseException, lines: int = 25) -> str:
    """The exception, shortened to its last lines (the compiler's errors come last)."""
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    if len(text) > lines:
        text = [text[0], f"[... {len(text) - lines} lines ...]"] + text[-(lines - 1):]
    return "\n".join(text)


def _load(force: bool) -> Extension:
    if truthy("TBF_NO_EXTENSION"):
        return Extension(False, False, "turned off by TBF_NO_EXTENSION=1", disabled=True)
    start = time.perf_counter()
    plan = None
    try:
        plan = plan_build()
        marker, compiled = build(plan, force=force)
        if not compiled:  # the build loads what it compiles; a cached library is loaded here
            torch.ops.load_library(plan.library)
    except Exception as exc:  # no compiler, compile error, unwritable cache, undefined symbol
        where = (f" (build log: {os.path.join(plan.folder, BUILD_LOG)})"
                 if plan is not None and os.path.exists(os.path.join(plan.folder, BUILD_LOG))
                 else "")
        reason = f"{_summary(exc)}{where}"
        logger.debug("teacher-cache extension unavailable", exc_info=True)
        return Extension(False, False, reason, plan, seconds=time.perf_counter() - start)
    cuda = torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::unpack", "CUDA")
    seconds = time.perf_counter() - start
    logger.debug("teacher-cache extension %s in %.2f s: %s",
                 "compiled and loaded" if compiled else "loaded", seconds, plan.library)
    return Extension(True, cuda, None, plan, marker, compiled, seconds)


def ops():
    """torch.ops.tinybert_fast_cache, building and loading the extension first if needed;
    RuntimeError saying why and how to fix it when it is unavailable."""
    s = state()
    if not s.loaded:
        raise RuntimeError(f"the teacher cache needs the tinybert_fast C++ extension, which is "
                           f"not available: {s.error}\n{_HOW_TO_FIX}")
    return getattr(torch.ops, NAMESPACE)
