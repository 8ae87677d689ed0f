"""`tinybert-fast build-extension`: compile the teacher-cache extension now, not on first use.

The extension (csrc/) is compiled against the installed torch the first time the teacher cache is
used, into a cache folder (tinybert_fast._extension); this command does it ahead of time (CI
right after the install, a GPU session before its tests) and reports what was built, or that
a build already in the cache was loaded.  Exit status 1 if the build fails, or with --cuda if the
CUDA kernels were not built.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)

HELP = "compile (or find in the cache) the teacher-cache C++/CUDA extension and report it"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="compile again even if the cache holds a build")
    p.add_argument("--cuda", action="store_true",
                   help="fail unless the CUDA kernels are built (needs a CUDA torch, nvcc, and a "
                        "GPU or FORCE_CUDA=1 / TORCH_CUDA_ARCH_LIST)")


def run(args: argparse.Namespace) -> int:
    from .. import _extension as ext
    if ext.truthy("TBF_NO_EXTENSION"):
        raise ValueError("TBF_NO_EXTENSION=1 is set, which turns the extension off: unset it")
    try:
        s = ext.state(force=args.force)
    except ext.ExtensionError as exc:  # TBF_REQUIRE_EXTENSION=1
        log.error("the teacher-cache extension could not be built: %s", exc)
        return 1
    if not s.loaded:
        log.error("the teacher-cache extension could not be built: %s", s.error)
        return 1
    plan, marker = s.plan, s.marker or {}
    how = (f"compiled in {s.seconds:.0f} s" if s.compiled
           else f"loaded from the cache in {s.seconds:.2f} s (compiled in "
                f"{marker.get('build_seconds', '?')} s on {marker.get('built_at', '?')})")
    log.info("teacher-cache extension: %s", ext.ops().build_info())
    log.info("  %s", how)
    log.info("  library: %s", plan.library)
    log.info("  flavour: %s%s", plan.flavour,
             f" (TORCH_CUDA_ARCH_LIST={plan.arch_list}, {plan.nvcc_version})" if plan.with_cuda
             else "")
    for note in plan.notes:
        log.info("  %s", note)
    log.info("  CUDA kernels: %s", s.cuda_kernels)
    if args.cuda and not s.cuda_kernels:
        log.error("--cuda: the CUDA kernels were not built (%s)", "; ".join(plan.notes))
        return 1
    return 0
