"""The configuration reference in docs/configuration.md, generated from the config dataclasses (batch/config.py).

Every setting's key, default, environment variable and meaning (the comment on its line in the dataclass) fill the
block between the two markers below, so the page cannot drift from the code:

- `python docs/hooks/config_reference.py` rewrites that block in docs/configuration.md (`make docs` runs it);
- as a MkDocs hook (mkdocs.yml `hooks:`), it fills the block of the page being built, whatever the file holds;
- tests/test_docs.py fails when the committed block differs from a fresh generation.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import re
import sys
import tokenize
from pathlib import Path
from typing import Any

BEGIN = "<!-- config-reference: generated from batch/config.py by docs/hooks/config_reference.py -->"
END = "<!-- end of config-reference -->"
PAGE = Path(__file__).resolve().parents[1] / "configuration.md"


def field_comments(cls: type) -> dict[str, str]:
    """Each field's trailing comment in the class body: `name: type = default  # this`."""
    source = inspect.getsource(cls)
    comments: dict[str, str] = {}
    line_field: dict[int, str] = {}
    for number, line in enumerate(source.splitlines(), 1):
        match = re.match(r"^    (\w+): ", line)
        if match:
            line_field[number] = match.group(1)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and token.start[0] in line_field:
            comments[line_field[token.start[0]]] = token.string.lstrip("#").strip()
    return comments


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


def yaml_value(value: Any) -> str:
    """A default as config.yaml writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def reference() -> str:
    """The block's Markdown: one table per section, then the older variable names."""
    from batch.config import _CLASSES, ENV_ALIASES, env_name

    out = [BEGIN, ""]
    for section, cls in _CLASSES.items():
        comments = field_comments(cls)
        out += [f"### `{section}`", ""]
        doc = cls.__dict__.get("__doc__") or ""  # its own docstring, not the one dataclass makes up
        doc = inspect.cleandoc(doc) if not doc.startswith(cls.__name__ + "(") else ""
        if doc:
            out += [doc.split("\n\n")[0].replace("\n", " "), ""]
        out += ["| key | default | variable | meaning |", "|---|---|---|---|"]
        for field in dataclasses.fields(cls):
            meaning = comments.get(field.name, "")
            default = yaml_value(_default(field))
            variable = env_name(section, field.name)
            out.append(f"| `{section}.{field.name}` | `{_cell(default)}` | `{variable}` | {_cell(meaning)} |")
        out.append("")
    out += ["Older names, still honoured:", "", "| variable | same as |", "|---|---|"]
    out += [f"| `{alias}` | `{target}` |" for alias, target in ENV_ALIASES.items()]
    out += ["", END]
    return "\n".join(out)


def fill(markdown: str) -> str:
    """`markdown` with the block between the markers replaced by a fresh generation."""
    start, end = markdown.index(BEGIN), markdown.index(END) + len(END)
    return markdown[:start] + reference() + markdown[end:]


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    """MkDocs hook: the configuration page is built from the code, not from what the file happens to hold."""
    return fill(markdown) if BEGIN in markdown else markdown


if __name__ == "__main__":
    sys.path.insert(0, str(PAGE.parents[1]))
    text = PAGE.read_text()
    PAGE.write_text(fill(text))
    print(f"wrote {PAGE}")
