"""The documentation's relative links lead somewhere: every [text](path#anchor) in the README,
CONTRIBUTING.md, docs/ and the other READMEs names a file or directory that exists, and an
anchor names a heading of that file (GitHub's anchors)."""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).parents[2]
DOCS = sorted([ROOT / "README.md", ROOT / "CONTRIBUTING.md", ROOT / "CHANGELOG.md",
               *(ROOT / "docs").glob("*.md"), *(ROOT / "charts").glob("*/README.md"),
               *(ROOT / "deploy").glob("*/README.md"), ROOT / "examples" / "README.md"])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        if m := re.match(r"#{1,6} (.+)", line):
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: pathlib.Path) -> list[str]:
    text = FENCE.sub("", path.read_text())
    return [t for t in LINK.findall(text) if not re.match(r"[a-z][a-z+]*:", t)]


def test_the_documents_are_there():
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    assert {"README.md", "CONTRIBUTING.md", "docs/api.md", "docs/tenancy.md",
            "docs/failure-model.md", "docs/performance.md", "docs/stacks.md",
            "docs/development.md"} <= names
    assert all(p.is_file() for p in DOCS)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc):
    broken = []
    for target in links(doc):
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists() or ROOT.resolve() not in (dest, *dest.parents):
            broken.append(f"{target}: no such file")
        elif anchor and (dest.is_dir() or dest.suffix != ".md"):
            broken.append(f"{target}: an anchor into a file that is not Markdown")
        elif anchor and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.name}")
    assert broken == []


def test_the_slugs_are_githubs():
    assert slug("The BlockCopy API (`blockcopy.dev/v1alpha1`, short name `bc`)") == \
        "the-blockcopy-api-blockcopydevv1alpha1-short-name-bc"
    assert slug("Quick start: the demo") == "quick-start-the-demo"
    assert slug("Block-device destinations from the pod") == \
        "block-device-destinations-from-the-pod"


def test_the_checker_sees_a_broken_link(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text("# Title\n\n[ok](#title) [bad](#nope) [gone](b.md) [web](https://x.y)\n"
                   "```\n[in code](nowhere.md)\n```\n")
    assert links(doc) == ["#title", "#nope", "b.md"]
    assert anchors(doc) == {"title"}
