"""Safe media opening (no FIFO hangs, no symlinks, regular files only), atomic writes and submit's error handling."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import socket
import stat
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner
from spool_env import SpoolEnv

from batch.cli import main
from batch.errors import MediaError, VlbatchError
from batch.infer.safe_open import SYMLINK_REASON, fd_path, open_media, open_regular, sha256_of
from batch.service import atomic_write
from batch.service.atomic_write import SymlinkRefused, write_atomic
from batch.service.spool.spool import is_job_name
from batch.service.spool.submit import SubmitError, submit_job
from batch.service.store.store import file_sha256

TIMEOUT = 5.0


def _raise_in_thread(func, path: Path) -> BaseException | None:
    """Run func(path) in a daemon thread; fail the test (and unblock it) if it does not return within TIMEOUT."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            func(path)
            outcome.append(None)
        except BaseException as exc:  # handed back to the test
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(TIMEOUT)
    if thread.is_alive():
        with open(path, "wb"):  # a writer releases a reader blocked in open(); the test still fails
            pass
        thread.join(TIMEOUT)
        pytest.fail(f"{func.__name__}({path}) blocked on a FIFO")
    return outcome[0]


def _refusal(func, path: Path) -> MediaError:
    with pytest.raises(MediaError) as info:
        func(path)
    assert info.value.path == str(path)
    return info.value


# safe_open ---------------------------------------------------------------------------------------


def test_a_regular_file_opens_blocking_and_hashes_like_hashlib(tmp_path):
    data = os.urandom((1 << 20) + 12345)  # more than one block
    media = tmp_path / "photo.jpg"
    media.write_bytes(data)
    fd = open_regular(media)
    try:
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        assert os.read(fd, 4) == data[:4]
    finally:
        os.close(fd)
    with open_media(media) as fh:
        assert fh.read() == data
    assert sha256_of(media) == hashlib.sha256(data).hexdigest() == file_sha256(media)


@pytest.mark.parametrize("func", [open_regular, sha256_of, file_sha256])
def test_a_fifo_is_refused_at_once_instead_of_blocking(tmp_path, func):
    fifo = tmp_path / "swapped.jpg"
    os.mkfifo(fifo)
    error = _raise_in_thread(func, fifo)
    assert isinstance(error, MediaError), error
    assert error.reason == "not a regular file (a FIFO)"


def test_a_character_device_is_refused():
    assert _refusal(open_regular, Path(os.devnull)).reason == "not a regular file (a character device)"


def test_a_directory_is_refused(tmp_path):
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    assert _refusal(sha256_of, folder).reason == "not a regular file (a directory)"


def test_a_socket_is_refused(tmp_path):
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("sock.jpg")  # relative: the test runs in tmp_path, and socket paths are short
        assert _refusal(open_regular, Path("sock.jpg")).reason == "not a regular file (a socket)"


def test_a_symlink_at_the_final_component_is_refused(tmp_path):
    real = tmp_path / "real.jpg"
    real.write_bytes(b"x")
    link = tmp_path / "link.jpg"
    link.symlink_to(real)
    assert _refusal(open_regular, link).reason == SYMLINK_REASON
    assert "symbolic link" in SYMLINK_REASON and "swapped" in SYMLINK_REASON


def test_a_missing_file_is_reported(tmp_path):
    assert _refusal(open_regular, tmp_path / "gone.jpg").reason == "file not found"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_file_is_reported(tmp_path):
    media = tmp_path / "secret.jpg"
    media.write_bytes(b"x")
    media.chmod(0)
    assert _refusal(open_regular, media).reason == "permission denied"


@pytest.mark.parametrize("code", [errno.EACCES, errno.EPERM])
def test_a_denied_open_is_reported(tmp_path, monkeypatch, code):
    def denied(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "open", denied)
    error = _refusal(open_regular, tmp_path / "secret.jpg")
    monkeypatch.undo()
    assert error.reason == "permission denied"


def test_a_refused_file_leaves_no_fd_open(tmp_path, monkeypatch):
    opened: list[int] = []
    real_open = os.open

    def recording_open(*args, **kwargs):
        fd = real_open(*args, **kwargs)
        opened.append(fd)
        return fd

    monkeypatch.setattr(os, "open", recording_open)
    folder = tmp_path / "folder"
    folder.mkdir()
    _refusal(open_regular, folder)
    monkeypatch.undo()
    assert len(opened) == 1
    with pytest.raises(OSError) as info:
        os.fstat(opened[0])
    assert info.value.errno == errno.EBADF


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_fd_path_names_the_opened_file_even_after_the_name_is_swapped(tmp_path):
    media = tmp_path / "clip.mp4"
    media.write_bytes(b"original")
    fd = open_regular(media)
    try:
        path = fd_path(fd)
        assert path == f"/proc/self/fd/{fd}"
        (tmp_path / "other").write_bytes(b"swapped in")
        os.replace(tmp_path / "other", media)
        with open(path, "rb") as fh:
            assert fh.read() == b"original"
    finally:
        os.close(fd)


# write_atomic ------------------------------------------------------------------------------------


def _names(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_write_atomic_writes_and_replaces(tmp_path):
    target = tmp_path / "answer.txt"
    write_atomic(target, "first ✓")
    assert target.read_text(encoding="utf-8") == "first ✓"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    write_atomic(target, b"second", mode=0o640)
    assert target.read_bytes() == b"second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert _names(tmp_path) == ["answer.txt"]


def test_write_atomic_refuses_a_symlink_and_leaves_its_target_alone(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    link = tmp_path / "answer.txt"
    link.symlink_to(victim)
    with pytest.raises(SymlinkRefused) as info:
        write_atomic(link, "evil")
    assert isinstance(info.value, OSError) and info.value.errno == errno.ELOOP
    assert info.value.filename == str(link) and str(link) in str(info.value)
    assert victim.read_text() == "keep me" and link.is_symlink()
    assert _names(tmp_path) == ["answer.txt", "victim.txt"]


def test_a_symlink_planted_at_the_old_temp_name_has_no_effect(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    planted = tmp_path / f".answer.txt.{os.getpid()}.tmp"
    planted.symlink_to(victim)
    write_atomic(tmp_path / "answer.txt", "answer")
    assert (tmp_path / "answer.txt").read_text() == "answer"
    assert victim.read_text() == "keep me" and planted.is_symlink()


def test_temp_names_are_hidden_tmp_names_the_spool_ignores(tmp_path):
    seen: list[Path] = []
    write_atomic(tmp_path / "job.yaml", "prompt: hi\n", check=seen.append)
    (tmp,) = seen
    assert tmp.parent == tmp_path and tmp.name.startswith(".vlbatch-") and tmp.name.endswith(".tmp")
    assert len(tmp.name) == len(".vlbatch-12345678.tmp")  # fixed: a 255-byte target name still fits
    assert not is_job_name(tmp.name)
    assert _names(tmp_path) == ["job.yaml"]


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("call", ["write", "fsync"])
def test_a_failed_write_leaves_no_temp_file_and_the_old_file_intact(tmp_path, monkeypatch, call):
    target = tmp_path / "answer.txt"
    target.write_text("old")
    monkeypatch.setattr(atomic_write.os, call, _enospc)
    with pytest.raises(OSError) as info:
        write_atomic(target, "new")
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["answer.txt"]


def test_short_writes_are_completed(tmp_path, monkeypatch):
    real_write = os.write
    monkeypatch.setattr(atomic_write.os, "write", lambda fd, data: real_write(fd, bytes(data[:3])))
    write_atomic(tmp_path / "answer.txt", "a longer answer")
    monkeypatch.undo()
    assert (tmp_path / "answer.txt").read_text() == "a longer answer"


def test_a_failed_check_leaves_nothing(tmp_path):
    def check(tmp: Path) -> None:
        raise ValueError("no")

    with pytest.raises(ValueError):
        write_atomic(tmp_path / "job.yaml", "prompt: hi\n", check=check)
    assert _names(tmp_path) == []


# submit ------------------------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path) -> SpoolEnv:
    e = SpoolEnv(tmp_path, tmp_path / "model")
    e.write_config()
    e.image("a.png")
    (e.media / "job.yaml").write_text("prompt: hi\ninputs: a.png\n")
    e.inbox.mkdir(parents=True)
    return e


def _submit(env: SpoolEnv):
    return CliRunner().invoke(main, ["--config", str(env.config_path), "submit", str(env.media / "job.yaml")])


def test_submit_writes_the_job_into_the_inbox(env):
    result = _submit(env)
    assert result.exit_code == 0, result.stderr
    assert _names(env.inbox) == ["job.yaml"]
    assert str(env.media / "a.png") in (env.inbox / "job.yaml").read_text()


def test_no_space_during_submit_is_one_clear_line_and_leaves_nothing(env, monkeypatch):
    monkeypatch.setattr(atomic_write.os, "fsync", _enospc)
    result = _submit(env)
    monkeypatch.undo()
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        f"vlbatch: error: {env.inbox / 'job.yaml'}: cannot write the job into the inbox (No space left on device)"
    )
    assert "Traceback" not in result.output
    assert _names(env.inbox) == []


def test_an_unwritable_inbox_is_reported(env, monkeypatch):
    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(env.inbox))

    monkeypatch.setattr(atomic_write.tempfile, "mkstemp", denied)  # as a read-only inbox does (even for root)
    with pytest.raises(SubmitError) as info:
        submit_job(env.media / "job.yaml", env.config())
    monkeypatch.undo()
    assert isinstance(info.value, VlbatchError)
    assert str(info.value) == f"{env.inbox / 'job.yaml'}: cannot write the job into the inbox (Permission denied)"
    assert _names(env.inbox) == []


def test_a_job_refused_in_the_inbox_leaves_nothing(env, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.png").write_bytes((env.media / "a.png").read_bytes())
    (elsewhere / "job.yaml").write_text("prompt: hi\ninputs: b.png\n")
    result = CliRunner().invoke(main, ["--config", str(env.config_path), "submit", str(elsewhere / "job.yaml")])
    assert result.exit_code == 1 and "outside the allowed media folders" in result.stderr
    assert _names(env.inbox) == []
