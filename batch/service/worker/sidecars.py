"""The sidecar files vlbatch writes beside media files: writing them, and removing them once their media is gone.

Two formats, chosen by the job's `sidecar` key:

* ``txt``: the answer as plain UTF-8 text in ``<media stem>.txt`` (``photo.jpg`` -> ``photo.txt``);
* ``xmp``: an XMP sidecar, ``<media name>.xmp`` (``photo.jpg`` -> ``photo.jpg.xmp``, the darktable and digiKam
  convention: one sidecar per file, so a camera's ``photo.cr2`` + ``photo.jpg`` pair never share one), holding the
  answer as the photo's caption, ``dc:description`` (an ``rdf:Alt`` with ``xml:lang="x-default"``), which
  Lightroom, digiKam, darktable and exiftool read as the description.

A sidecar is vlbatch's when the ``sidecars`` table holds its exact bytes (by SHA-256, anywhere: a copied folder
keeps its own). Any other file at that name (a caption someone wrote, another program's XMP) is never replaced
unless the job says ``sidecar_overwrite``, and never removed. Writes are atomic (``write_atomic``: a hidden O_EXCL
temp name of fixed length, fsync, rename) and never go through a symbolic link.

A sidecar that cannot be written for a reason waiting does not cure (no permission on the media folder, a read-only
share, a name too long for the file system) is skipped: one ``sidecar.skipped`` warning with the path and reason,
and the answer stays recorded. Only faults of the machine (a full disk, an I/O error: `faults.is_passing`) are
raised, for the worker to wait out. Paths are recorded in the ``sidecars`` table in `paths.encode_path`'s form.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from batch.errors import MediaError
from batch.infer.media import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from batch.infer.safe_open import BLOCK_SIZE, open_media, sha256_of
from batch.service.atomic_write import SymlinkRefused, write_atomic
from batch.service.faults import describe, is_passing
from batch.service.logs import event
from batch.service.spool.jobfile import SIDECAR_FORMATS
from batch.service.store.paths import encode_path

if TYPE_CHECKING:
    from batch.service.spool.jobfile import Job
    from batch.service.store.store import Store

log = logging.getLogger("batch.service.worker.sidecars")

# XML 1.0 allows tab, LF, CR and everything from U+0020 up, but not surrogates, U+FFFE and U+FFFF
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
_ESCAPES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\r": "&#13;"}  # a literal CR would be read back as LF

_XMP = """<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>
<x:xmpmeta xmlns:x="adobe:ns:meta/" x:xmptk="vlbatch">
 <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">
  <rdf:Description rdf:about=""
    xmlns:dc="http://purl.org/dc/elements/1.1/">
   <dc:description>
    <rdf:Alt>
     <rdf:li xml:lang="x-default">{caption}</rdf:li>
    </rdf:Alt>
   </dc:description>
  </rdf:Description>
 </rdf:RDF>
</x:xmpmeta>
<?xpacket end="w"?>
"""


def sidecar_path(media: Path, kind: str) -> Path:
    """Where the `kind` sidecar of a media file goes: ``photo.txt`` for txt, ``photo.jpg.xmp`` for xmp."""
    if kind == "txt":
        return media.with_suffix(".txt")
    if kind == "xmp":
        return media.with_name(media.name + ".xmp")
    raise ValueError(f"unknown sidecar format {kind!r}; known: {', '.join(SIDECAR_FORMATS)}")


def xml_text(text: str) -> str:
    """`text` as XML 1.0 character data: &, < and > escaped, CR kept as a reference, forbidden characters dropped."""
    return "".join(_ESCAPES.get(char, char) for char in _NOT_XML.sub("", text))


def xmp_document(caption: str) -> str:
    """An XMP sidecar whose only property is the caption, as dc:description (x-default)."""
    return _XMP.format(caption=xml_text(caption))


def sidecar_bytes(answer: str, kind: str) -> bytes:
    """The bytes of a `kind` sidecar holding `answer`: the same answer always gives the same bytes."""
    text = xmp_document(answer) if kind == "xmp" else answer
    return text.encode("utf-8", "replace")  # "replace": a lone surrogate in the answer cannot stop the write


def write_sidecar(store: Store, media: Path, kind: str, result_id: int, overwrite: bool = False) -> Path | None:
    """Write the answer `result_id` as the `kind` sidecar of `media`; the path written, or None when it was kept.

    An existing file is replaced only when vlbatch wrote exactly its bytes, or with `overwrite`; a symbolic link
    (or a folder, a FIFO) is never replaced, nor written through. Each refusal is logged as a ``sidecar.kept``
    warning with the reason.
    A sidecar that already holds these bytes is left untouched (photo managers reread files whose time changed).
    """
    path = sidecar_path(media, kind)
    data = sidecar_bytes(store.result(result_id)["answer"] or "", kind)
    digest = hashlib.sha256(data).hexdigest()
    try:
        info: os.stat_result | None = os.lstat(path)
    except FileNotFoundError:
        info = None
    if info is not None and not stat.S_ISREG(info.st_mode):  # a symlink, a folder, a FIFO: never replaced
        reason = "is a symbolic link" if stat.S_ISLNK(info.st_mode) else "is not a regular file"
        event(log, "sidecar.kept", logging.WARNING, path=path, reason=reason)
        return None
    if info is not None:
        try:
            current: str | None = sha256_of(path)
        except MediaError:  # swapped for something else since
            current = None
        ours = current is not None and store.wrote_sidecar(current)  # by content: a copied folder stays ours
        if ours and current == digest:
            store.record_sidecar(path, digest, result_id)
            return path
        if not ours and not overwrite:
            event(log, "sidecar.kept", logging.WARNING, path=path, reason="exists and was not written by vlbatch")
            return None
    try:
        write_atomic(path, data)  # a hidden random temp name (O_EXCL), fsync, rename; never through a symlink
    except SymlinkRefused:
        event(log, "sidecar.kept", logging.WARNING, path=path, reason="is a symbolic link")
        return None
    store.record_sidecar(path, digest, result_id)
    return path


def write_for_unit(store: Store, job: Job, unit: tuple[Path, ...], result_id: int) -> Path | None:
    """The job's sidecar for a unit's answer: one media file and a job with `sidecar` set; else nothing (None)."""
    if not job.sidecar or len(unit) != 1:
        return None
    try:
        return write_sidecar(store, unit[0], job.sidecar, result_id, job.sidecar_overwrite)
    except OSError as exc:
        if is_passing(exc):  # a full disk, an I/O error: the machine's, waited out by the worker
            raise
        # no permission, a read-only folder, a name too long: waiting changes nothing; the answer stays recorded
        event(
            log,
            "sidecar.skipped",
            logging.WARNING,
            path=encode_path(sidecar_path(unit[0], job.sidecar)),
            reason=_reason(exc),
        )
        return None


def _reason(exc: OSError) -> str:
    """Why a file operation failed, in words: the system's message with its errno name (Permission denied (EACCES))."""
    name = errno.errorcode.get(exc.errno or 0)
    return f"{exc.strerror} ({name})" if exc.strerror and name else describe(exc)


def remove_sidecar(store: Store, media: Path, kind: str) -> bool:
    """Remove the `kind` sidecar of a media file that is gone, if vlbatch wrote exactly its bytes; whether it did.

    A symbolic link, anything but a regular file, a file whose bytes vlbatch did not write (edited since, or
    someone else's) and a file that changes while it is checked all stay. A ``photo.txt`` also stays while
    another media file of that stem (``photo.png`` beside a gone ``photo.jpg``) is there: it may be that file's.
    """
    path = sidecar_path(media, kind)
    if kind == "txt" and _has_namesake(media):
        return False
    try:
        with open_media(path) as handle:  # O_NOFOLLOW, regular files only
            before = os.fstat(handle.fileno())
            digest = hashlib.sha256()
            for block in iter(lambda: handle.read(BLOCK_SIZE), b""):
                digest.update(block)
        if not store.wrote_sidecar(digest.hexdigest()):
            return False
        now = os.lstat(path)
    except (MediaError, OSError):
        return False
    if not stat.S_ISREG(now.st_mode) or _identity(now) != _identity(before):
        return False  # replaced or changed while it was read
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if is_passing(exc):
            raise
        event(log, "sidecar.kept", logging.WARNING, path=encode_path(path), reason=f"cannot remove it: {_reason(exc)}")
        return False
    return True


def remove_gone(job: Job, media: Path, store: Store) -> bool:
    """Remove every sidecar vlbatch wrote beside `media`, a file gone from the job's folder; whether any went.

    Both formats are looked for, whatever the job asks for now: a standing job switched from txt to xmp leaves no
    stale ``.txt`` behind. `job` is the job the file belonged to (its settings do not narrow the removal).
    """
    removed = [remove_sidecar(store, media, kind) for kind in SIDECAR_FORMATS]  # each one looked at
    return any(removed)


def _identity(info: os.stat_result) -> tuple[int, int, int, int]:
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _has_namesake(media: Path) -> bool:
    """Whether another media file with the same stem lies beside `media` (lower- or upper-case suffix)."""
    for suffix in (*IMAGE_EXTENSIONS, *VIDEO_EXTENSIONS):
        for variant in (suffix, suffix.upper()):
            other = media.with_suffix(variant)
            if other.name != media.name and os.path.lexists(other):
                return True
    return False
