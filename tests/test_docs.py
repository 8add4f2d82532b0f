"""The README stays a newcomer's page and the docs stay connected: every relative link and
anchor resolves, and every setting appears in the README's index and in docs/configuration.md.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from app.settings import Settings
from tests.harness.deploy import PROJECT_ROOT

README = PROJECT_ROOT / "README.md"
DOCS = PROJECT_ROOT / "docs"
README_MAX_LINES = 250


def pages() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    found = set()
    for line in path.read_text().splitlines():
        match = re.match(r"^#{1,6} (.+)$", line)
        if match:
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            found.add(text.replace(" ", "-"))
    return found


def test_readme_is_short() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README has {len(lines)} lines; move depth to docs/"


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.name)
def test_relative_links_resolve(page: Path) -> None:
    text = page.read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    checked = 0
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue
        target, _, anchor = link.partition("#")
        path = (page.parent / target).resolve() if target else page
        assert path.exists(), f"{page.name}: {link} points nowhere"
        if anchor:
            assert anchor in anchors(path), f"{page.name}: no heading for #{anchor} in {path.name}"
        checked += 1
    if page == README:
        assert checked >= 10, "the README links its docs"


def test_every_doc_is_linked_from_the_readme() -> None:
    readme = README.read_text()
    for doc in DOCS.glob("*.md"):
        assert f"(docs/{doc.name})" in readme, f"link docs/{doc.name} from the README"


def test_every_setting_is_in_the_readme_index_and_the_configuration_page() -> None:
    readme = README.read_text()
    configuration = (DOCS / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)`", configuration, flags=re.M))
    for name in (field.upper() for field in Settings.model_fields):
        assert f"`{name}`" in readme, f"add {name} to the README's configuration index"
        # A helper may document its settings in its own docs page, linked from the README.
        elsewhere = any(f"| `{name}`" in doc.read_text() for doc in DOCS.glob("*.md"))
        assert name in documented or elsewhere, f"document {name} in docs/configuration.md"
