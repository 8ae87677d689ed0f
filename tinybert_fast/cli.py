"""The `tinybert-fast` console script: one subcommand per module.

Each subcommand lives in its own module (tinybert_fast.commands.<name>), which defines
    HELP: str                                  one line for `tinybert-fast --help`
    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int       the exit status
A command module imports only what its parser needs; what a subcommand runs (the loop, the
models, augmentation, the teacher cache) is imported by its `run`.  Running a subcommand
imports that subcommand's module alone; `tinybert-fast --help` (or a command line naming no
known subcommand) imports every command module, for the list of subcommands.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

# subcommand -> module (relative to tinybert_fast)
COMMANDS = {
    "finetune-teacher": ".commands.finetune",
    "distill": ".commands.distill",
    "eval": ".commands.eval",
    "cache": ".commands.cache",
    "augment": ".commands.augment",
    "study": ".commands.study",
    "plot": ".commands.plot",
    "build-extension": ".commands.build_extension",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help text (where the flag has a value and its help does not
    already say it); descriptions and epilogs (the stage-defaults table) printed as written."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (action.default is not None and not isinstance(action.default, bool)
                and action.default is not argparse.SUPPRESS and "default" not in text
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


def quiet_libraries(level: str) -> None:
    """Hugging Face's load reports ("some weights were not initialized ...") and loading bars
    only at --log-level DEBUG."""
    if level == "DEBUG":
        return
    try:
        import transformers
    except ImportError:
        return
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        import huggingface_hub.utils
        huggingface_hub.utils.disable_progress_bars()
    except (ImportError, AttributeError):
        pass


def _named_command(argv: list[str]) -> str | None:
    """The subcommand a command line names (its first positional argument), if it is one."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--log-level":
            i += 2
            continue
        if arg.startswith("-"):
            i += 1
            continue
        return arg if arg in COMMANDS else None
    return None


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; given the command line, with the subparser of the subcommand it names alone
    (so that only that command's module is imported), else with every subcommand's."""
    parser = argparse.ArgumentParser(prog="tinybert-fast", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    named = _named_command(argv) if argv is not None else None
    for name, module_name in COMMANDS.items():
        if named is not None and name != named:
            continue
        module = importlib.import_module(module_name, __package__)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP,
                           formatter_class=HelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


# Exceptions that report a mistake in what the user handed over (their message names it): the
# readers' InputError (a ValueError), the checks' ValueError/TypeError, a missing optional
# package, and the OS's errors about the user's paths.
USER_ERRORS = (ValueError, TypeError, ImportError, FileNotFoundError, IsADirectoryError,
               NotADirectoryError, FileExistsError, PermissionError)
# ... and these, by module and class name: loaded only when the module was (checking them must
# not import the teacher cache or safetensors): a damaged or foreign cache folder, a damaged
# safetensors file that no check caught
USER_ERROR_NAMES = (("tinybert_fast.cache.errors", "CacheError"),
                    ("safetensors", "SafetensorError"))
MAX_MESSAGE = 1500  # characters of one error line


def is_user_error(exc: BaseException) -> bool:
    """Whether `exc` reports a user's mistake (USER_ERRORS, USER_ERROR_NAMES) rather than a bug."""
    if isinstance(exc, USER_ERRORS):
        return True
    for module_name, class_name in USER_ERROR_NAMES:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return True
    return False


def one_line(exc: BaseException) -> str:
    """The message of an exception on one line: an OSError as `path: reason`, whitespace
    (transformers' multi-line messages) collapsed, at most MAX_MESSAGE characters."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= MAX_MESSAGE else text[:MAX_MESSAGE - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; returns its exit status.

    A mistake in the user's input (is_user_error: tinybert_fast.errors.InputError and the
    ValueError, TypeError, ImportError and path errors of the checks) is one line on stderr,
    `tinybert-fast COMMAND: error: MESSAGE`, and exit status 2.  Any other exception is a bug:
    one line `tinybert-fast COMMAND: internal error: TYPE: MESSAGE` and exit status 1.  At
    --log-level DEBUG the traceback is printed before either line.  Argparse's own errors (an
    unknown flag, a bad choice) keep argparse's usage message and exit status 2.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s: %(message)s")
    quiet_libraries(args.log_level)
    try:
        from . import _backend
        _backend.get_backend()  # an invalid TINYBERT_FAST_BACKEND, before anything runs
        return args._module.run(args)
    except Exception as exc:  # the one boundary where every failure becomes one line
        user = is_user_error(exc)
        if args.log_level == "DEBUG":
            traceback.print_exc(file=sys.stderr)
        if user:
            print(f"tinybert-fast {args.command}: error: {one_line(exc)}", file=sys.stderr)
            return 2
        hint = "" if args.log_level == "DEBUG" else " (--log-level DEBUG prints the traceback)"
        print(f"tinybert-fast {args.command}: internal error: {type(exc).__name__}: "
              f"{one_line(exc)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
