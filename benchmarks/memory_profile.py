"""Peak memory of a command, split by kind: ``python -m benchmarks.memory_profile [--out F] -- CMD ...``

Runs CMD as a child process and samples its /proc/<pid>/status every --interval seconds:
RssAnon (heap: tensors, Python objects, allocator caches), RssFile (file-backed pages: shared
libraries such as libtorch_cuda, and mmap'd files such as a teacher cache: reclaimable by the
kernel, shared with the page cache) and RssShmem. A stage is the log line the child last printed
(its stderr is passed through and watched), so the report says which part of a run held the peak.
Linux only (reads /proc). Prints one JSON object; --out also writes it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time

FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


def read_status(pid: int) -> dict[str, int] | None:
    """{field: MB} from /proc/<pid>/status, or None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            text = f.read()
    except OSError:
        return None
    out = {}
    for field in FIELDS:
        m = re.search(rf"^{field}:\s+(\d+) kB", text, re.M)
        if m:
            out[field] = int(m.group(1)) / 1024
    return out


def profile(cmd: list[str], interval: float = 0.1) -> dict:
    stage = ["start"]
    stages: dict[str, dict[str, float]] = {}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace")

    def watch_stderr() -> None:
        for line in proc.stderr:
            sys.stderr.write(line)
            # "2026-12-03 08:02:29,834 tinybert_fast.distill: finetune step 78 dev ..." -> a stage
            m = re.match(r"\S+ \S+ ([\w.]+): (.{0,60})", line)
            if m:
                stage[0] = re.sub(r"\d+", "N", f"{m.group(1)}: {m.group(2)}").strip()

    threading.Thread(target=watch_stderr, daemon=True).start()
    start = time.monotonic()
    peak: dict[str, float] = {}
    while proc.poll() is None:
        status = read_status(proc.pid)
        if status:
            for k, v in status.items():
                peak[k] = max(peak.get(k, 0.0), v)
            rec = stages.setdefault(stage[0], {})
            for k in ("VmRSS", "RssAnon", "RssFile"):
                rec[k] = max(rec.get(k, 0.0), status.get(k, 0.0))
        time.sleep(interval)
    return {"command": cmd, "returncode": proc.returncode,
            "wall_s": round(time.monotonic() - start, 1),
            "peak_MB": {k: round(v) for k, v in peak.items()},
            "peak_by_stage_MB": {s: {k: round(v) for k, v in r.items()} for s, r in stages.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--interval", type=float, default=0.1, help="seconds between samples")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- then the command")
    args = p.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        p.error("cmd: expected a command after --")
    if not os.path.exists("/proc/self/status"):
        p.error("needs Linux /proc")
    result = profile(cmd, args.interval)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        from tinybert_fast._io import atomic_write
        atomic_write(args.out, text + "\n")
    return result["returncode"]


if __name__ == "__main__":
    sys.exit(main())
