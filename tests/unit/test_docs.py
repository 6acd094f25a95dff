"""The README and the user pages in docs/: the generated config reference equals the code's, every
relative link and anchor resolves, the README stays a front door. No network: links to other sites
are not followed."""

import dataclasses
import re
from pathlib import Path

import pytest

from ia2dist.config import PROTOCOL_DEFAULTS, RunConfig

ROOT = Path(__file__).parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"(?<!\!)\[[^\]]*\]\(([^)\s]+)\)")


def _leaf_fields(cls, prefix=""):
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _leaf_fields(type(default), f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_config_page_is_generated_from_the_code():
    """docs/config.md is what ``python -m ia2dist.docs_config`` prints: a field added or changed
    without regenerating the page (or without a docstring) fails here."""
    from ia2dist.docs_config import render

    committed = (ROOT / "docs" / "config.md").read_text()
    assert committed == render(), ("docs/config.md is out of date: run "
                                   "`python -m ia2dist.docs_config > docs/config.md`")


def test_config_page_documents_every_field_with_its_protocol_defaults():
    from ia2dist.config import CustomTaskConfig

    page = (ROOT / "docs" / "config.md").read_text()
    fields_part, protocol_part = page.split("\n## Protocol defaults\n")
    rows = {line.split("`")[1]: line for line in fields_part.splitlines() if line.startswith("| `")}
    fields = [*_leaf_fields(RunConfig), *(f"data.custom.{f.name}"
                                          for f in dataclasses.fields(CustomTaskConfig))]
    assert not [f for f in fields if f not in rows], "docs/config.md lacks fields"
    undocumented = [f for f in fields if rows[f].rstrip().endswith("|  |")]
    assert not undocumented, f"fields without a docstring: {undocumented}"
    for dotted in PROTOCOL_DEFAULTS:  # both defaults shown: reference / ia2dist
        assert re.search(r"\| `[^`]+` / `[^`]+` \|", rows[dotted]), rows[dotted]
    assert "| `train.lr` | `0.0001` / `0.001` |" in page
    assert all(f"| `{dotted}` |" in protocol_part for dotted in PROTOCOL_DEFAULTS)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats
    numbered; code blocks hold no headings."""
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def _links(path: Path):
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in LINK.findall(text):
        if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: are not followed
            yield target


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in _links(page):
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with that anchor in {dest.name}")
        elif ROOT not in dest.parents and dest != ROOT:
            broken.append(f"{target}: outside the repository")
    assert not broken, broken


def test_link_check_catches_a_broken_link_and_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## Run states\n\n[ok](#run-states) [bad](#nope) "
                                    "[gone](b.md) [web](https://example.org)\n```\n[x](y.md)\n```\n")
    assert list(_links(tmp_path / "a.md")) == ["#run-states", "#nope", "b.md"]
    assert _anchors(tmp_path / "a.md") == {"title", "run-states"}


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 15 * 1024, f"README.md is {len(readme.encode())} bytes"
    quick = readme.split("## Quick start", 1)[1].split("```", 2)[1]
    assert quick.split("\n", 1)[1].strip().splitlines() == ["make demo", "make test"]
    for section in ("Install", "Your model on GPUs", "Your own data", "Resume",
                    "Results and export", "Links"):
        assert f"\n## {section}\n" in readme, section
    status = readme.split("> **Status**", 1)[1].split("\n\n", 1)[0]
    for fact in ("CPU", "2-core", "No line has run on a GPU", "make gpu-check", "SmolLM2-135M"):
        assert fact in status, fact


def test_every_docs_page_is_listed_in_the_index():
    index = (ROOT / "docs" / "README.md").read_text()
    for page in PAGES[1:]:
        if page.name != "README.md":
            assert f"]({page.name})" in index, page.name
