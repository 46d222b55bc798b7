"""The repository's own docs: the mathematics the code cites lives in docs/MATH.md, the layers of
docs/ARCHITECTURE.md are the ones tests/test_layers.py enforces, and every link resolves."""

from __future__ import annotations

import re
from pathlib import Path

from test_layers import LAYERS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_code_cites_only_the_repository():
    """No docstring points outside the checkout (the design brief is not part of it); every docs/ page
    a module names exists."""
    for path in sorted([*(ROOT / "poslsh").rglob("*.py"), *(ROOT / "poslsh_lab").rglob("*.py")]):
        text = path.read_text()
        assert "../shared" not in text and "DESIGN.md" not in text, path
        for page in re.findall(r"docs/([A-Z]+\.md)", text):
            assert (DOCS / page).exists(), (path, page)


def test_math_page_covers_what_the_code_cites():
    text = (DOCS / "MATH.md").read_text()
    for topic in ("**cut.**", "**grid.**", "**split**", "**fused**", "**Max norm.**", "**Block sizes.**",
                  "**Spectral norm.**", "**Attention, for all Q, K, V at once.**", "w_h = ceil(ln(1/ε) / m_h)",
                  "## 6. The hybrid"):
        assert topic in text, topic


def test_architecture_layers_are_the_enforced_ones():
    rows = re.findall(r"^\| (\d+) ([a-z ]+) \| ([^|]+) \|", (DOCS / "ARCHITECTURE.md").read_text(), re.M)
    documented = [(name.strip(), sorted(re.findall(r"`([^`]+)`", modules)))
                  for _, name, modules in rows]
    assert documented == [(name, sorted(prefixes)) for name, prefixes in LAYERS]


def test_every_docs_link_resolves():
    for page in sorted(DOCS.glob("*.md")):
        for target in re.findall(r"\]\(([^)#]+)\)", page.read_text()):
            if not target.startswith("http"):
                assert (page.parent / target).exists(), (page.name, target)
