"""The Triton cache a lent GPU carries: filled and packed here, unpacked and checked there.

    python -m benchmarks.triton_cache pack DIR OUT.tar.xz    # here, after `python -m
                                                             # benchmarks.static --cache-dir DIR`
    python -m benchmarks.triton_cache check OUT.tar.xz       # here: the manifest against this
                                                             # checkout (gpu_session.sh --dry-run)
    python -m benchmarks.triton_cache unpack OUT.tar.xz DIR  # on the GPU: extract, re-point, compare
    python -m benchmarks.triton_cache count DIR --save S.json            # on the GPU, before a step
    python -m benchmarks.triton_cache count DIR --since S.json [--json F] # after it: what compiled

Why each step: Triton looks a compiled kernel up by a key that hashes Triton's own build (version
and the files of its wheel, which differ per Python version), the kernel's source and the source of
everything it calls, its specialisation and options, and the target (`cuda:90`): a cache filled by
the GPU image's Triton (3.6) under its Python (3.12), for its target, from this checkout's kernels,
is hit by the GPU's first launch.  A cache entry is a folder per key holding the cubin, the
metadata (`<kernel>.json`) and a group file (`__grp__<kernel>.json`) that lists its files by
*absolute path*: `unpack` re-points those paths to where the cache now lies, or every lookup would
miss.  `pack` keeps only what a launch reads (cubin, metadata, group; not the PTX or IR: about a
tenth of the size) and writes a manifest, BUILD.json, of what the cache was built from.

`count` is the check that the keys matched: every JIT compile during the lease writes a new cubin
into the cache folder, so the cubins that appear during a step are its compiles.  They are split
into this package's kernels (which should be 0: each one is a key the carried cache missed, or a
specialisation the static tool does not produce) and other kernels (torch.compile's Inductor
kernels, compiled on the device by design).  Triton's launcher stubs (a small C module per kernel
signature, built with the machine's C compiler) are counted apart: they are not kernel compiles.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import platform
import re
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = "BUILD.json"
# What a cache hit reads: the cubin, the metadata and the group file (CompiledKernel skips the
# files a group lists that are not there).
KEEP = (".cubin", ".json")


def kernel_sources() -> list[Path]:
    """The files whose text enters the kernels' cache keys: the kernels and what they import."""
    return sorted((ROOT / "tinybert_fast" / "kernels").glob("*.py")) + [
        ROOT / "tinybert_fast" / "_semantics.py"]


def sources_sha256() -> str:
    h = hashlib.sha256()
    for p in kernel_sources():
        h.update(p.relative_to(ROOT).as_posix().encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def package_kernels() -> set[str]:
    """Names of this package's @triton.jit kernels (a cubin is named after its kernel)."""
    names = set()
    for p in kernel_sources():
        names.update(re.findall(r"@triton\.jit\s*\ndef (\w+)\(", p.read_text()))
    return names


def _entries(cache: Path) -> dict[str, str]:
    """{entry folder: kernel name} of every compiled kernel (cubin) in a Triton cache folder."""
    return {c.parent.name: c.stem for c in cache.glob("*/*.cubin")}


def _launchers(cache: Path) -> set[str]:
    return {p.parent.name for p in cache.glob("*/*.so")}


def pack(cache: Path, out: Path, note: str = "") -> dict:
    """Archive the kernels of `cache` (cubin, metadata, group files) with a manifest."""
    import triton
    entries = _entries(cache)
    if not entries:
        raise SystemExit(f"pack: no compiled kernel (*.cubin) under {cache}")
    targets = set()
    for entry in entries:
        for meta in (cache / entry).glob("*.json"):
            if not meta.name.startswith("__grp__"):
                target = json.loads(meta.read_text()).get("target", {})
                targets.add(f"{target.get('backend')}:{target.get('arch')}")
    kernels: dict[str, int] = {}
    for name in entries.values():
        kernels[name] = kernels.get(name, 0) + 1
    manifest = {
        "triton": triton.__version__,
        "python": platform.python_version(),
        "targets": sorted(targets),
        "kernel_sources_sha256": sources_sha256(),
        "entries": len(entries),
        "kernels": dict(sorted(kernels.items())),
        "note": note,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:xz") as tar:
        data = json.dumps(manifest, indent=1).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        for entry in sorted(entries):
            for f in sorted((cache / entry).iterdir()):
                if f.suffix not in KEEP:
                    continue
                if not f.name.startswith("__grp__"):
                    tar.add(f, arcname=f"{entry}/{f.name}")
                    continue
                # the group lists only what is packed (Triton 3.8 misses on a group with a file
                # gone; 3.6 skips it), by name: unpack makes the paths absolute again
                group = json.loads(f.read_text())
                group["child_paths"] = {name: Path(path).name
                                        for name, path in group["child_paths"].items()
                                        if Path(path).suffix in KEEP}
                data = json.dumps(group).encode()
                info = tarfile.TarInfo(f"{entry}/{f.name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return manifest


def read_manifest(archive: Path) -> dict:
    with tarfile.open(archive, "r:xz") as tar:
        return json.load(tar.extractfile(MANIFEST))


def compare(manifest: dict, on_device: bool) -> list[str]:
    """Mismatches between what the cache was built from and this checkout (and, on the device,
    this machine's Triton, Python and GPU)."""
    bad = []
    if manifest["kernel_sources_sha256"] != sources_sha256():
        bad.append("the kernels changed since the cache was built (kernel_sources_sha256): every "
                   "changed kernel will compile on the device; rebuild with gpu_prepare.sh")
    if on_device:
        import triton
        if manifest["triton"] != triton.__version__:
            bad.append(f"built by Triton {manifest['triton']}, this machine has {triton.__version__}")
        built_py = ".".join(manifest["python"].split(".")[:2])
        here_py = ".".join(platform.python_version().split(".")[:2])
        if built_py != here_py:
            bad.append(f"built under Python {built_py}, this machine has {here_py} (Triton's key "
                       "hashes its own files, which differ per Python version)")
        import torch
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            here = f"cuda:{major * 10 + minor}"
            if here not in manifest["targets"]:
                bad.append(f"built for {manifest['targets']}, this GPU is {here}")
    return bad


def unpack(archive: Path, cache: Path) -> dict:
    """Extract into `cache` and re-point every group file to the files' new place."""
    cache.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "r:xz") as tar:
        members = [m for m in tar.getmembers() if m.name != MANIFEST]
        for m in members:  # entry/file only: nothing outside the cache folder
            if m.name.startswith("/") or ".." in Path(m.name).parts or not m.isfile():
                raise SystemExit(f"unpack: unexpected member {m.name!r} in {archive}")
        tar.extractall(cache, members=members)
        manifest = json.load(tar.extractfile(MANIFEST))
    for grp in cache.glob("*/__grp__*.json"):
        data = json.loads(grp.read_text())
        data["child_paths"] = {name: str(grp.parent / Path(path).name)
                               for name, path in data["child_paths"].items()}
        grp.write_text(json.dumps(data))
    return manifest


def snapshot(cache: Path) -> dict:
    return {"time": time.time(), "kernels": _entries(cache),
            "launchers": sorted(_launchers(cache))}


def since(cache: Path, before: dict) -> dict:
    """What compiled into `cache` after the snapshot `before`: cubins written since, under a new
    key or (a lookup that missed although the key matched, e.g. a group file pointing elsewhere)
    over a carried one."""
    now = snapshot(cache)
    ours = package_kernels()
    new = {e: n for e, n in now["kernels"].items()
           if e not in before["kernels"] or (cache / e / f"{n}.cubin").stat().st_mtime
           >= before["time"]}
    return {
        "package_kernel_compiles": sorted(n for n in new.values() if n in ours),
        "other_kernel_compiles": len([n for n in new.values() if n not in ours]),
        "launcher_builds": len(set(now["launchers"]) - set(before["launchers"])),
        "cache_kernels": len(now["kernels"]),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_cache",
                                description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("cache", type=Path)
    a.add_argument("out", type=Path)
    a.add_argument("--note", default="")
    a = sub.add_parser("check")
    a.add_argument("archive", type=Path)
    a = sub.add_parser("unpack")
    a.add_argument("archive", type=Path)
    a.add_argument("cache", type=Path)
    a = sub.add_parser("count")
    a.add_argument("cache", type=Path)
    a.add_argument("--save", type=Path, help="write the snapshot here")
    a.add_argument("--since", type=Path, help="report what compiled after this snapshot")
    a.add_argument("--json", type=Path, help="with --since: also write the report here")
    args = p.parse_args(argv)
    if args.cmd == "pack":
        m = pack(args.cache, args.out, args.note)
        print(f"packed {m['entries']} kernels ({len(m['kernels'])} distinct) built by Triton "
              f"{m['triton']} / Python {m['python']} for {m['targets']}: {args.out} "
              f"({args.out.stat().st_size / 2**20:.1f} MiB)")
        return 0
    if args.cmd == "check":
        if not args.archive.is_file():
            print(f"check: no cache archive at {args.archive}")
            return 1
        m = read_manifest(args.archive)
        bad = compare(m, on_device=False)
        print(f"cache {args.archive}: {m['entries']} kernels, Triton {m['triton']} / Python "
              f"{m['python']}, {m['targets']}, {args.archive.stat().st_size / 2**20:.1f} MiB")
        for line in bad:
            print(f"  MISMATCH: {line}")
        return int(bool(bad))
    if args.cmd == "unpack":
        m = unpack(args.archive, args.cache)
        bad = compare(m, on_device=True)
        print(f"unpacked {m['entries']} kernels (Triton {m['triton']} / Python {m['python']}, "
              f"{m['targets']}) into {args.cache}")
        for line in bad:
            print(f"  MISMATCH: {line}")
        return int(bool(bad))
    if args.since:
        report = since(args.cache, json.loads(args.since.read_text()))
        line = json.dumps(report)
        print(line)
        if args.json:
            args.json.write_text(line + "\n")
        return 0
    snap = snapshot(args.cache)
    if args.save:
        args.save.write_text(json.dumps(snap))
    print(f"{len(snap['kernels'])} compiled kernels, {len(snap['launchers'])} launchers in "
          f"{args.cache}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
