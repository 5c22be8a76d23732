"""The documentation against the code: the settings table of docs/serving.md, relative links, the README's length.

The settings table and the code cannot drift: every PERCEPIANO_* name the code reads must have a row, every row
must name something the code reads, and the service's documented defaults must equal the Settings dataclass's.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from runtime.serve.settings import LEGACY_ALIASES, Settings

REPO = Path(__file__).resolve().parents[1]
SETTINGS_PAGE = REPO / "docs" / "serving.md"
SETTINGS_HEADING = "## Settings"
# Where the code reads its settings (tests/ is left out: tests set variables, they do not define them).
SOURCE_DIRS = ("runtime", "deploy", "convert", "benchmarks", "scripts")
SOURCE_SUFFIXES = {".py", ".sh", ".js", ".html", ".toml", ".txt"}
NAME = re.compile(r"PERCEPIANO_[A-Z0-9_]*[A-Z0-9]")
README_MAX_LINES = 250
UNSET = "unset"  # the table's word for a default of None / not set


def settings_table(text: str) -> dict[str, str]:
    """{name: default cell} of the first table under SETTINGS_HEADING (one row per `PERCEPIANO_*` name)."""
    section = text.split(f"\n{SETTINGS_HEADING}\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, str] = {}
    in_table = False
    for line in section.splitlines():
        if not line.startswith("|"):
            if in_table:
                break
            continue
        in_table = True
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in ("name", "") or set(cells[0]) <= set("-: "):
            continue  # header and separator
        name = cells[0].strip("`")
        assert NAME.fullmatch(name), f"settings row {line!r}: the first cell is not one PERCEPIANO_* name"
        assert name not in rows, f"{name} has two rows"
        rows[name] = cells[1]
    return rows


def names_in_source() -> dict[str, list[str]]:
    """{PERCEPIANO_* name: files mentioning it} over the source folders."""
    found: dict[str, list[str]] = {}
    for folder in SOURCE_DIRS:
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix not in SOURCE_SUFFIXES or "__pycache__" in path.parts or not path.is_file():
                continue
            for name in set(NAME.findall(path.read_text(errors="replace"))):
                found.setdefault(name, []).append(str(path.relative_to(REPO)))
    return found


def documented_value(cell: str) -> str | None:
    """The default as the table writes it: the first `code` span, or None for 'unset'."""
    code = re.search(r"`([^`]*)`", cell)
    if code:
        return code.group(1)
    assert cell.lower().startswith(UNSET), f"default cell {cell!r}: give a `value` or '{UNSET}'"
    return None


def as_setting(text: str | None, kind: type):
    """A documented default as the Settings field's value: unset / auto -> None, bools from 0/1, numbers."""
    if text is None or text.lower() in ("auto", "none"):
        return None
    if kind is bool:
        return {"0": False, "1": True}[text]
    if kind is str:
        return text
    return float(text.replace("_", ""))


@pytest.fixture(scope="module")
def table() -> dict[str, str]:
    return settings_table(SETTINGS_PAGE.read_text())


def test_every_setting_the_code_reads_has_a_row(table):
    service = {var for var, _ in Settings.ENV.values()} | set(LEGACY_ALIASES)
    in_source = names_in_source()
    missing = {name: files for name, files in in_source.items() if name not in table}
    missing.update({name: ["runtime/serve/settings.py (Settings.ENV)"] for name in service - set(table)})
    assert not missing, f"settings the code reads but {SETTINGS_PAGE.name}'s table lacks: {missing}"


def test_every_row_names_a_setting_the_code_reads(table):
    read = set(names_in_source()) | {var for var, _ in Settings.ENV.values()} | set(LEGACY_ALIASES)
    unread = sorted(set(table) - read)
    assert not unread, f"rows of {SETTINGS_PAGE.name}'s table that no code reads: {unread}"


def test_service_defaults_match_the_settings_dataclass(table):
    defaults = {f.name: f.default for f in dataclasses.fields(Settings)}
    wrong = {}
    for field, (var, kind) in Settings.ENV.items():
        documented = as_setting(documented_value(table[var]), kind)
        if documented != defaults[field]:
            wrong[var] = (table[var], defaults[field])
    assert not wrong, f"documented default vs the dataclass's: {wrong}"
    for old in LEGACY_ALIASES:  # an alias has no default of its own
        assert documented_value(table[old]) is None, f"{old} is an alias: its default is '{UNSET}'"


def markdown_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    anchors = set()
    for line in strip_fences(text).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title, flags=re.ASCII).replace(" ", "-"))
    return anchors


def strip_fences(text: str) -> str:
    """The text without fenced code blocks."""
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def strip_code(text: str) -> str:
    """The text without fenced code blocks or inline code (links there are examples, not links)."""
    return re.sub(r"`[^`\n]*`", "", strip_fences(text))


def relative_links(text: str) -> list[str]:
    targets = re.findall(r"\]\(([^)\s]+)\)", strip_code(text))
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: ...


def test_docs_exist():
    assert (REPO / "README.md").is_file() and SETTINGS_PAGE.is_file()
    assert len(markdown_files()) > 5


@pytest.mark.parametrize("page", markdown_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_at_existing_files_and_headings(page):
    broken = []
    for target in relative_links(page.read_text()):
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in heading_anchors(dest.read_text()):
            broken.append(target)
    assert not broken, f"{page.relative_to(REPO)}: broken links {broken}"


def test_readme_is_a_short_guide():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md is {len(lines)} lines; the guide's limit is {README_MAX_LINES}"
