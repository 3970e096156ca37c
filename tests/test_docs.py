"""The README is short and points into docs/: every relative link and #anchor in README.md, DEVELOPERS.md and
docs/*.md must lead somewhere, or a reader following the table of commands lands on nothing."""

import re
from pathlib import Path

import pytest
from helpers import REPO

PAGES = [REPO / "README.md", REPO / "DEVELOPERS.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    return {github_anchor(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_github_anchor_matches_githubs_rule():
    assert github_anchor("Set-up: two commands") == "set-up-two-commands"
    assert github_anchor("`gptforge serve`: security and limits") == "gptforge-serve-security-and-limits"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_and_anchors_resolve(page):
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.S)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor}")
    assert not broken, broken


def test_the_readme_stays_short_and_lists_every_command():
    from gptforge.cli import BY_NAME

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(readme.splitlines()) <= 200
    missing = [name for name in BY_NAME if f"`gptforge {name}`" not in readme]
    assert not missing, f"commands missing from the README's table: {missing}"
