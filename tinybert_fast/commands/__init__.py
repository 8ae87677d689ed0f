"""The `tinybert-fast` subcommands, one module each; argparse lives only here.

Each module defines
    HELP: str                                  one line for `tinybert-fast --help`
    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int       the exit status
and imports at its top only what its parser needs (argparse, the task names, the stage
defaults): `run` imports the loop, the models or augmentation when the subcommand runs.
`_args` holds the arguments that several subcommands share, defined once.
"""
