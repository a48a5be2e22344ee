"""The site's home page is the README: one front door, whether it is read on a forge or in the built site.

docs/index.md holds only a pointer; as a MkDocs hook (mkdocs.yml `hooks:`) this module builds that page from
README.md instead, with the README's links into docs/ made relative to the site.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parents[2] / "README.md"


def home_markdown() -> str:
    """README.md as a page of the site: `docs/x.md` links become `x.md`."""
    return README.read_text().replace("](docs/", "](")


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    return home_markdown() if page.file.src_uri == "index.md" else markdown
