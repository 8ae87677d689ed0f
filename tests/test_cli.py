"""The console script: one module per subcommand, imported only when its subcommand runs or
for `--help` (tinybert_fast.cli, tinybert_fast.commands)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules_after(code: str) -> set[str]:
    """The tinybert_fast modules a fresh interpreter has imported after running `code`."""
    probe = (f"import sys\n{code}\n"
             f"print(__import__('json').dumps(sorted(m for m in sys.modules "
             f"if m.startswith('tinybert_fast'))))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=ROOT, check=True, timeout=300)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


HEAVY = {"tinybert_fast.distill.loop", "tinybert_fast.distill.models",
         "tinybert_fast.distill.objective", "tinybert_fast.distill.cache_glue",
         "tinybert_fast.evaluate", "tinybert_fast.cache"}


def test_a_subcommand_imports_its_own_module_alone():
    loaded = _modules_after(
        "from tinybert_fast import cli\n"
        "try:\n    cli.main(['eval', '--help'])\nexcept SystemExit:\n    pass")
    assert "tinybert_fast.commands.eval" in loaded
    others = {"tinybert_fast.commands.distill", "tinybert_fast.commands.finetune",
              "tinybert_fast.commands.augment", "tinybert_fast.commands.cache",
              "tinybert_fast.commands.build_extension", "tinybert_fast.augment"}
    assert not loaded & (others | HEAVY), sorted(loaded & (others | HEAVY))


def test_the_command_modules_do_not_import_the_loop():
    loaded = _modules_after("import tinybert_fast.commands.distill, tinybert_fast.commands.eval")
    assert "tinybert_fast.distill.config" in loaded
    assert not loaded & HEAVY, sorted(loaded & HEAVY)


def test_help_lists_every_subcommand_without_loading_the_loop(capsys):
    loaded = _modules_after(
        "from tinybert_fast import cli\n"
        "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass")
    assert {"tinybert_fast.commands.distill", "tinybert_fast.commands.finetune",
            "tinybert_fast.commands.eval", "tinybert_fast.commands.augment"} <= loaded
    assert not loaded & HEAVY, sorted(loaded & HEAVY)
    from tinybert_fast import cli
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in text


def test_the_data_flags_are_defined_once_and_keep_their_defaults():
    import argparse
    import importlib

    from tinybert_fast.cli import COMMANDS
    parsers = {}
    for name in ("distill", "finetune-teacher", "eval"):
        p = argparse.ArgumentParser()
        importlib.import_module(COMMANDS[name], "tinybert_fast").add_arguments(p)
        parsers[name] = p
    common = ["--task", "sst2", "--data-dir", "d"]
    ev = parsers["eval"].parse_args(["--model", "m", *common])
    assert (ev.task, ev.data_dir, ev.max_length, ev.device) == ("sst2", "d", 128, "auto")
    ds = parsers["distill"].parse_args(["--stage", "task1", "--teacher", "t", "--student", "s",
                                        "--output-dir", "o", *common, "--train-file", "f"])
    assert (ds.task, ds.data_dir, ds.train_file, ds.max_length) == ("sst2", "d", "f", None)
    ft = parsers["finetune-teacher"].parse_args(["--model", "m", "--output-dir", "o", *common])
    assert (ft.task, ft.limit_train, ft.pad_to_max_length) == ("sst2", None, False)
    with pytest.raises(SystemExit):  # argparse's own error for a bad choice, as before
        parsers["eval"].parse_args(["--model", "m", "--task", "imdb"])


def test_finetune_without_task_is_a_value_error(capsys):
    from tinybert_fast import cli
    assert cli.main(["finetune-teacher", "--model", "tinybert4", "--output-dir", "o"]) == 2
    assert capsys.readouterr().err == "tinybert-fast finetune-teacher: error: --task is required\n"


def test_the_augment_package_is_the_documented_function():
    import tinybert_fast as tbf
    assert callable(tbf.augment) and "augment" in tbf.__all__
    from tinybert_fast.augment import augment
    with pytest.raises(ValueError, match="not a file"):
        tbf.augment("/nonexistent/in.tsv", "/nonexistent/out.tsv")
    assert tbf.augment.augment is augment


def test_device_resolution_names_the_argument():
    import torch

    from tinybert_fast import train
    from tinybert_fast._device import resolve_device
    assert train.resolve_device is resolve_device
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
