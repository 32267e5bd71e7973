"""One numbering of the contract: every "semantics.md §N" the code, docs and notebooks cite is a heading of
docs/semantics.md, and no text uses another scheme ("SPEC section N") that a reader would have to translate."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUFFIXES = {".py", ".md", ".ipynb", ".json", ".js", ".toml", ".cfg"}
SKIP = {".venv", ".venv-kvpress", ".git", "goldens", "node_modules", "build", "__pycache__"}
CITE = re.compile(r"semantics(?:\.md)?\)? ?§(\d+b?)(?:-(\d+b?))?")
OTHER_SCHEME = re.compile(r"SPEC('s)? sections? \d")


def project_files():
    for path in ROOT.rglob("*"):
        if (path.suffix in SUFFIXES and path.is_file() and not SKIP & set(path.relative_to(ROOT).parts)
                and path != Path(__file__).resolve()):  # this file holds planted examples
            yield path


def headings() -> set[str]:
    text = (ROOT / "docs" / "semantics.md").read_text()
    return set(re.findall(r"^## (\d+b?)\. ", text, re.M))


def citations(text: str) -> list[str]:
    return [n for m in CITE.finditer(text) for n in m.groups() if n]


def test_semantics_has_its_numbered_sections():
    assert {"1", "2", "3", "6b", "8", "9"} <= headings()


def test_every_citation_names_a_section_and_no_other_scheme_is_used():
    known, wrong, other = headings(), [], []
    for path in project_files():
        text = path.read_text(errors="replace")
        wrong += [f"{path.relative_to(ROOT)}: §{n}" for n in citations(text) if n not in known]
        other += [f"{path.relative_to(ROOT)}: {m.group(0)}" for m in OTHER_SCHEME.finditer(text)]
    assert not wrong, f"citations of sections docs/semantics.md does not have: {wrong}"
    assert not other, f"another numbering than docs/semantics.md's: {other}"


def test_the_checks_catch_what_they_should():
    assert citations("see semantics.md §3 and (semantics.md) §6b, semantics.md §1-7") == ["3", "6b", "1", "7"]
    assert "12" not in headings() and citations("semantics.md §12") == ["12"]
    assert OTHER_SCHEME.search("the criterion (SPEC section 2)")
    assert not OTHER_SCHEME.search("SPEC's scores")
