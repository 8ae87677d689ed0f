"""The one error type for a mistake in what a user hands over: a file (a TSV, a corpus, a JSON or
TOML grid, a model folder), a command-line argument or an environment variable.

    raise InputError("is not UTF-8", path="glue/SST-2/train.tsv", line=17, column=33,
                     found="byte 0xff", expected="UTF-8 text")
    str(exc) == "glue/SST-2/train.tsv:17:33: is not UTF-8: found byte 0xff, expected UTF-8 text"

It subclasses ValueError, so `except ValueError` keeps catching what the readers raised before.
The command line (tinybert_fast.cli) prints it as one line on stderr and exits with status 2.
Where a mistake has a place it is written `file:line:column` (the form editors and compilers
use, so a terminal can jump to it); line and column count from 1, the column in characters.
"""

from __future__ import annotations

__all__ = ["InputError"]


class InputError(ValueError):
    """A user's input is wrong.  Attributes (None where they do not apply):

    path      the file or folder
    line      1-based line of the file (a TSV row's line, a JSON error's line)
    column    1-based column of that line, in characters
    argument  the command-line argument or environment variable ("--output-dir",
              "TINYBERT_FAST_BACKEND", "teacher (--teacher)")
    found     what was there ("byte 0xff", "5 columns", "'bogus'")
    expected  what was expected ("UTF-8 text", "4 columns as the header", "one of ...")
    """

    def __init__(self, message: str, *, path: str | None = None, line: int | None = None,
                 column: int | None = None, argument: str | None = None,
                 found: object = None, expected: object = None):
        self.message, self.path, self.line, self.column = message, path, line, column
        self.argument, self.found, self.expected = argument, found, expected
        super().__init__(self._text())

    @property
    def where(self) -> str:
        """`argument path:line:column`, each part where it is known ("" if none is)."""
        place = "" if self.path is None else str(self.path)
        if self.path is not None and self.line is not None:
            place += f":{self.line}"
            if self.column is not None:
                place += f":{self.column}"
        return " ".join(p for p in (self.argument, place) if p)

    def _text(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        parts = [f"found {self.found}" if self.found is not None else "",
                 f"expected {self.expected}" if self.expected is not None else ""]
        tail = ", ".join(p for p in parts if p)
        return f"{text}: {tail}" if tail else text

    def __reduce__(self):  # picklable with its keywords (multiprocessing, DDP workers)
        return (_rebuild, (self.message, dict(path=self.path, line=self.line, column=self.column,
                                              argument=self.argument, found=self.found,
                                              expected=self.expected)))


def _rebuild(message: str, fields: dict) -> InputError:
    return InputError(message, **fields)
