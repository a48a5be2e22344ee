"""File names as the database stores them: any POSIX path, losslessly, as printable UTF-8 text.

A POSIX path is bytes. Python hands a name that is not UTF-8 (byte 0xff from an old camera or a Windows tool)
over as text with lone surrogates (``surrogateescape``: byte 0xff is U+DCFF), which SQLite and UTF-8 refuse.
Every path vlbatch records (``results.media_paths``, ``job_results.media_paths``, ``jobs.inflight``,
``standing_files.path``, ``sidecars.path``) goes through :func:`encode_path` first, and every stored path the
worker opens again goes through :func:`decode_path`:

* a backslash is written ``\\\\`` (two backslashes);
* a byte that is not printable UTF-8 text (a byte of an invalid UTF-8 sequence, a control character such as a
  newline or a tab, DEL) is written ``\\xHH`` (two lower-case hex digits);
* everything else (ASCII, any valid UTF-8 character, a leading dash) is written as it is.

The stored text is also the display form: ``vlbatch results`` (table, JSON, CSV) shows it unchanged, one line
per name. A name that is printable UTF-8 without a backslash (nearly every name) is stored exactly as before.
Decoding is lenient: a backslash that starts no escape of this form stays a backslash, so a path an older release
stored raw (with a literal backslash or newline) still opens.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable

_ESCAPE = re.compile(r"\\(\\|x([0-9a-f]{2}))")
_SURROGATE_BYTES = range(0xDC80, 0xDD00)  # surrogateescape's stand-ins for the bytes 0x80-0xff


def encode_path(path: str | bytes | os.PathLike[str] | os.PathLike[bytes]) -> str:
    """A path as printable text that :func:`decode_path` turns back into exactly the same path."""
    text = os.fsdecode(path)
    out = []
    for char in text:
        code = ord(char)
        if char == "\\":
            out.append("\\\\")
        elif code in _SURROGATE_BYTES:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif 0xD800 <= code < 0xE000:  # a lone surrogate no file system gives; kept as UTF-8's replacement
            out.append("\\xef\\xbf\\xbd")
        else:
            out.append(char)
    return "".join(out)


def decode_path(text: str) -> str:
    """The path (str, surrogateescape for bytes that are not UTF-8, as os.listdir gives) that `text` stores."""
    if "\\" not in text:
        return text
    raw = bytearray()
    pos = 0
    for match in _ESCAPE.finditer(text):
        raw += text[pos : match.start()].encode("utf-8", "surrogateescape")
        raw += b"\\" if match.group(2) is None else bytes([int(match.group(2), 16)])
        pos = match.end()
    raw += text[pos:].encode("utf-8", "surrogateescape")
    return os.fsdecode(bytes(raw))


def paths_json(paths: Iterable[str | os.PathLike[str]]) -> str:
    """A unit's paths as the JSON list of stored names that ``media_paths`` and ``jobs.inflight`` hold."""
    return json.dumps([encode_path(p) for p in paths], ensure_ascii=False)


def decode_paths_json(text: str | None) -> list[str]:
    """The real paths of a ``media_paths`` (or ``jobs.inflight``) JSON list."""
    return [decode_path(p) for p in json.loads(text or "[]")]


def storable_text(text: str) -> str:
    """Free text (an error message, a traceback) that may quote a file name: bytes that are not UTF-8 written
    ``\\xHH`` so that SQLite and a UTF-8 file take it; everything else unchanged."""
    if not any(0xD800 <= ord(c) < 0xE000 for c in text):
        return text
    return "".join(
        f"\\x{ord(c) - 0xDC00:02x}" if ord(c) in _SURROGATE_BYTES else "\ufffd" if 0xD800 <= ord(c) < 0xE000 else c
        for c in text
    )
