"""The grid of `tinybert-fast study`: cells of DistillConfig field values, parsed from
--grid KEY=V1,V2 flags or a JSON/TOML grid file, checked against each field's type, and turned
into the `distill` flags of a run (tinybert_fast.study plans and runs them)."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import re
import typing

from .errors import InputError

# options a grid may not vary: the study sets them per run
RESERVED = ("output_dir", "seed", "resume", "teacher_cache")


# --- the grid --------------------------------------------------------------------------------------

def parse_grid_flags(items: list[str]) -> dict[str, list[str]]:
    """["KEY=V1,V2", ...] -> {KEY: [V1, V2]}.  A list-valued option's items are joined by ':'
    (mapping_layers=2:4:6,1:3:5)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise InputError("not KEY=V1,V2,...", argument="--grid", found=repr(item),
                             expected="KEY=V1,V2,... (e.g. mapping=uniform,top)")
        split = [v.strip() for v in values.split(",")]
        if not values.strip() or any(not v for v in split):
            raise InputError(f"{key}: empty value", argument="--grid", found=repr(item),
                             expected="values separated by single commas")
        if key in grid:
            raise InputError(f"{key} is given twice", argument="--grid")
        grid[key] = split
    return grid


def _grid_text(path: str) -> dict:
    """The table of a .json or .toml grid file; InputError at file:line:column when it does not
    parse."""
    at = dict(argument="--grid-file", path=path)
    if not path.endswith((".toml", ".json")):
        raise InputError("not a .json or .toml file", **at, expected="grid.json or grid.toml")
    if not os.path.isfile(path):
        raise InputError("no such file" if not os.path.exists(path) else "not a file", **at,
                         expected="a JSON or TOML table of key = [values]")
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = len(raw[raw.rfind(b"\n", 0, exc.start) + 1:exc.start].decode("utf-8")) + 1
        raise InputError("not UTF-8 text", **at, line=line, column=column,
                         found=f"byte 0x{raw[exc.start]:02x}", expected="UTF-8") from None
    if path.endswith(".json"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"not valid JSON ({exc.msg})", **at, line=exc.lineno,
                             column=exc.colno) from None
    import tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # Python < 3.14 gives the place only inside the message: "... (at line 1, column 2)"
        found = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
        message = re.sub(r"\s*\(at line \d+, column \d+\)", "", str(exc))
        raise InputError(f"not valid TOML ({message})", **at,
                         line=int(found.group(1)) if found else None,
                         column=int(found.group(2)) if found else None) from None


def load_grid_file(path: str) -> dict[str, list[str]]:
    """A grid from a JSON or TOML file: {key: value or [values]}; a list-valued option's value
    is a list ([[2, 4, 6], [1, 3, 5]]).  InputError naming --grid-file and the file (and its
    line and column for a file that does not parse)."""
    raw = _grid_text(path)
    if not isinstance(raw, dict):
        raise InputError("not a table", argument="--grid-file", path=path,
                         found=type(raw).__name__, expected="a table of key = [values]")

    def text(v):
        if isinstance(v, list):
            return ":".join(str(x) for x in v)
        return str(v).lower() if isinstance(v, bool) else str(v)

    grid = {}
    for key, values in raw.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise InputError(f"{key} has no values", argument="--grid-file", path=path)
        grid[key.replace("-", "_")] = [text(v) for v in values]
    return grid


DESIGNS = ("product", "one-at-a-time")


def cells(grid: dict[str, list[str]], design: str = "product") -> list[dict[str, str]]:
    """The grid's cells, keys sorted (one empty cell for an empty grid).  The first is always the
    baseline: every key at its first value.

    product: every combination of the values.  one-at-a-time: the baseline, then for each key
    (sorted) each of its other values with every other key at its first value (1 + sum of
    (values - 1) cells instead of their product)."""
    keys = sorted(grid)
    if design == "product":
        return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]
    if design != "one-at-a-time":
        raise InputError("unknown design", argument="--design", found=repr(design),
                         expected=" or ".join(DESIGNS))
    baseline = {k: grid[k][0] for k in keys}
    return [baseline] + [{**baseline, k: v} for k in keys for v in grid[k][1:]]


def cell_id(cell: dict[str, str]) -> str:
    """'key=value' pairs sorted by key, joined by '__' ('base' for the empty cell)."""
    if not cell:
        return "base"
    return "__".join(f"{k}={v.replace('/', '_')}" for k, v in sorted(cell.items()))


@functools.cache
def grid_fields() -> dict[str, type]:
    """{DistillConfig field a grid may vary: its type without None} (every field but RESERVED):
    bool, int, float, str or list[int]."""
    from .distill.config import DistillConfig
    hints = typing.get_type_hints(DistillConfig)
    out = {}
    for f in dataclasses.fields(DistillConfig):
        if f.name in RESERVED:
            continue
        kinds = [t for t in typing.get_args(hints[f.name]) if t is not type(None)] \
            or [hints[f.name]]
        out[f.name] = kinds[0]
    return out


def _default(name: str):
    from .distill.config import DistillConfig
    return next(f.default for f in dataclasses.fields(DistillConfig) if f.name == name)


def _as_bool(key: str, value: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise InputError(f"grid key {key!r} is a switch: its values must be true or false",
                     found=repr(value), expected="true or false")


def cell_value(key: str, value: str):
    """A grid value as its DistillConfig field's type (grid_fields): InputError naming the key
    for an unknown or reserved key or a value of the wrong type."""
    if key in RESERVED:
        raise InputError(f"grid key {key!r} is set by the study for each run; it cannot be "
                         f"varied")
    fields = grid_fields()
    kind = fields.get(key)
    if kind is None:
        raise InputError(f"unknown grid key {key!r}: not a distill option (the keys are the "
                         f"options without dashes and with '_': {', '.join(sorted(fields))})")
    if kind is bool:
        return _as_bool(key, value)
    convert = {int: int, float: float, str: str}.get(kind)
    try:
        if typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            return [item(x) for x in value.split(":")]
        return convert(value)
    except (TypeError, ValueError):
        raise InputError(f"grid key {key!r}: the value is not of the option's type",
                         found=repr(value), expected=getattr(kind, "__name__", str(kind))) \
            from None


def flag(key: str) -> str:
    """The distill flag of a DistillConfig field: --<field with '-'>, or --no-<field> for a
    switch that is on by default (--no-eval, --no-progress)."""
    name = key.replace("_", "-")
    return f"--no-{name}" if grid_fields().get(key) is bool and _default(key) is True \
        else f"--{name}"


def cell_argv(cell: dict[str, str]) -> list[str]:
    """The `distill` flags that set a cell's values (appended after the study's common flags,
    which they override), each value checked against its DistillConfig field's type."""
    argv: list[str] = []
    for key, value in sorted(cell.items()):
        typed = cell_value(key, value)
        if isinstance(typed, bool):
            if typed != _default(key):
                argv.append(flag(key))
            continue
        argv += [flag(key), ",".join(map(str, typed)) if isinstance(typed, list) else value]
    return argv
