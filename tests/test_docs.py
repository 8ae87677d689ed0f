"""The README and the docs site (docs/, mkdocs.yml), checked without building the site.

- README.md is a front page: at most README_MAX_BYTES bytes;
- every relative link and image of README.md and docs/**/*.md points at a file of the checkout,
  and its #anchor (if any) at a heading of that file; a link to a page's own heading likewise;
- every public name of tinybert_fast (its __all__) is documented by a page of docs/api/ (a
  `::: path` directive naming it, a `members:` entry, or a whole module whose top-level
  definitions it is);
- the README's set-up commands are the ones .ci/run runs after its from-scratch install.

`mkdocs build --strict` (CI, after the tests) checks the same links and anchors again, and that
every `:::` path resolves; these tests need no docs packages, so they run in every environment.
"""

from __future__ import annotations

import ast
import re
import unicodedata
from pathlib import Path

import pytest

import tinybert_fast

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = ROOT / "README.md"
README_MAX_BYTES = 20_000
SETUP_COMMANDS = ('pip install -e ".[test]"', "TRITON_INTERPRET=1 python -m pytest -q tests")

_FENCE = re.compile(r"^\s*(```|~~~)")
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a `# comment` in a bash block is not a heading)."""
    out, fenced = [], False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def slug(heading: str) -> str:
    """A heading's anchor as mkdocs (Python-Markdown's toc) makes it; GitHub's agrees for the
    headings these files use: inline code marks dropped, ASCII only, punctuation other than
    '-' and '_' removed, lower case, runs of spaces and hyphens made one '-'."""
    text = heading.replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(path: Path) -> set[str]:
    return {slug(m.group(2)) for line in _prose_lines(path.read_text(encoding="utf-8"))
            if (m := _HEADING.match(line))}


def links(path: Path) -> list[str]:
    """Every link and image target of a Markdown file, outside code blocks and inline code."""
    targets = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        line = re.sub(r"`[^`]*`", "", line)
        targets += [m.group(1) for m in _LINK.finditer(line)]
    return targets


MARKDOWN = [README, *sorted(DOCS.rglob("*.md"))]


def test_readme_is_a_front_page():
    size = len(README.read_bytes())
    assert size <= README_MAX_BYTES, (
        f"README.md is {size} bytes, over {README_MAX_BYTES}: move the detail to a page of docs/ "
        "and link it")


@pytest.mark.parametrize("page", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def test_links_are_found():
    """The link pattern finds the README's links (a pattern that found none would pass above)."""
    readme = links(README)
    assert "docs/index.md" in readme and "CHANGELOG.md" in readme, readme
    assert any("#" in t and t.startswith("docs/") for t in readme), readme
    assert "teacher-cache.md#building-the-extension" in links(DOCS / "getting-started.md")


def _module_file(dotted: str) -> Path | None:
    base = ROOT.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _top_level_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in tree.body
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")}


def api_documented() -> set[str]:
    """The names the pages of docs/api/ document: the last part of every `::: path`, the entries
    of its `members:` list, and, for a module directive without such a list, the module's public
    top-level functions and classes."""
    names: set[str] = set()
    for page in sorted((DOCS / "api").glob("*.md")):
        lines = page.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            m = re.match(r"^:::\s+([\w.]+)\s*$", line)
            if not m:
                continue
            path = m.group(1)
            names.add(path.rsplit(".", 1)[-1])
            block = []
            for follow in lines[i + 1:]:
                if follow.strip() and not follow.startswith(" "):
                    break
                block.append(follow)
            members = re.search(r"^\s+members:\s*(\S*)\s*$", "\n".join(block), re.M)
            if members and members.group(1) == "false":
                continue
            if members:
                names |= {item.group(1) for item in re.finditer(r"^\s+-\s+(\w+)\s*$",
                                                                "\n".join(block), re.M)}
            elif (module := _module_file(path)) is not None:
                names |= _top_level_names(module)
    return names


def test_api_reference_covers_the_public_names():
    documented = api_documented()
    assert "TeacherCache" in documented and "attention_mse" in documented, documented
    missing = sorted(set(tinybert_fast.__all__) - documented)
    assert not missing, (f"public names of tinybert_fast that no page of docs/api/ documents: "
                         f"{missing} (add a `::: path` directive or a `members:` entry)")


def test_readme_setup_is_what_ci_runs():
    readme = README.read_text(encoding="utf-8")
    setup = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for command in SETUP_COMMANDS:
        assert command in setup, f"README's 'Set up' no longer says {command!r}"
        assert re.search(rf"^\s*{re.escape(command)}\s*$", ci, re.M), (
            f".ci/run no longer runs the README's set-up command {command!r} on a line of its own")
