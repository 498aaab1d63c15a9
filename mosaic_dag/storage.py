"""Atomic writes and content hashes: a crash or a full disk never leaves a half-written artifact."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd

from mosaic_dag.errors import MosaicError


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hash of a JSON-serialisable object, independent of dict order."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


class WriteError(MosaicError, OSError):
    """An artifact could not be written (disk full, read-only folder, no permission); nothing was left behind."""


_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
# temp names: .mosaic-tmp.<target name>.<pid>@<host hash>.<random>[.old].tmp — the prefix says mosaic made it,
# the owner lets a sweep tell live writers from dead ones; nothing else is ever swept
TEMP_PREFIX = ".mosaic-tmp."
_TEMP_RE = re.compile(r"^\.mosaic-tmp\..+\.(\d+)@([0-9a-f]{8})\.[A-Za-z0-9_]+(\.old)?\.tmp$")
# the folders under data_dir that mosaic writes (and so may sweep); data_dir itself only at its top level
OWNED_FOLDERS = ("datasets", "hidden", "saes", "codes", "pooled", "results", "conditions", "report")


def _owner() -> str:
    return f"{os.getpid()}@{_HOST}"


def temp_prefix(target: Path) -> str:
    """Prefix for a temp file/folder beside ``target`` (pass to mkstemp/mkdtemp with suffix '.tmp')."""
    return f"{TEMP_PREFIX}{Path(target).name}.{_owner()}."


def _write_error(target: Path, err: OSError) -> WriteError:
    text = str(err).strip()
    reason = err.strerror or (text.splitlines()[0][:200] if text else type(err).__name__)
    out = WriteError(
        f"could not write {str(target)!r} ({reason}); free disk space or fix write permission on "
        f"{str(target.parent)!r}, then run again (nothing partial was kept)"
    )
    out.errno = err.errno
    return out


# libraries written in Rust (safetensors) report an OS failure as their own error type, text "(os error 28)"
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


@contextlib.contextmanager
def _as_write_error(target: Path) -> Iterator[None]:
    try:
        yield
    except MosaicError:
        raise
    except OSError as err:
        raise _write_error(target, err) from err
    except Exception as err:
        m = _RUST_OS_ERROR.search(str(err))
        if m is None:
            raise
        code = int(m.group(1))
        raise _write_error(target, OSError(code, os.strerror(code))) from err


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temp path beside ``target``; rename onto it only if the block succeeds.

    An ``OSError`` while writing (disk full, read-only folder) becomes a one-line ``WriteError``
    naming ``target``; the temp file is removed either way.
    """
    target = Path(target)
    with _as_write_error(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _as_write_error(target):
            yield tmp_path
            os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temp folder beside ``target``; it replaces ``target`` only if the block succeeds.

    Readers only ever see one complete folder: when two writers race, each rename is atomic and the
    folder left at ``target`` is one writer's complete output, never a mix. An ``OSError`` while
    writing becomes a one-line ``WriteError`` naming ``target``; the temp folder is removed either way.
    """
    target = Path(target)
    with _as_write_error(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        with _as_write_error(target):
            yield tmp
            if target.exists():  # replace an older copy: move it aside, put ours in, drop it
                old = target.with_name(f"{temp_prefix(target)}{secrets.token_hex(4)}.old.tmp")
                try:
                    os.replace(target, old)
                except FileNotFoundError:
                    pass  # a concurrent writer moved it aside this instant
                _place_dir(tmp, target)
                shutil.rmtree(old, ignore_errors=True)
            else:
                _place_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _place_dir(tmp: Path, target: Path, attempts: int = 100) -> None:
    """Rename ``tmp`` onto ``target``; if a concurrent writer's complete folder got there first, keep that one.

    The folder that blocked the rename may itself be moved aside by a third writer before we look
    (seen with four processes racing): then ``target`` is free again and the rename is retried.
    """
    for _ in range(attempts):
        try:
            os.replace(tmp, target)
            return
        except OSError as err:
            if target.exists():
                return
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    os.replace(tmp, target)  # still racing after every attempt: let the error speak


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created) for the block; other processes wait (POSIX flock).

    The lock is released when the block ends or the process dies, so a killed holder never leaves
    a stale lock behind.
    """
    import fcntl

    path = Path(path)
    with _as_write_error(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "a")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield
    finally:
        fh.close()  # closing drops the lock


def write_json(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))


def write_parquet(path: Path, df: pd.DataFrame) -> None:
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _newest_mtime(p: Path) -> float:
    """Latest modification time of ``p`` or anything inside it (a live writer keeps touching it)."""
    newest = 0.0
    try:
        newest = p.lstat().st_mtime
        if p.is_dir() and not p.is_symlink():
            for child in p.rglob("*"):
                newest = max(newest, child.lstat().st_mtime)
    except OSError:
        pass  # vanished while we looked: its writer finished or removed it
    return newest


def is_temp_name(name: str) -> bool:
    """True only for temp names mosaic itself creates (prefix + owner pid@host + random)."""
    return bool(_TEMP_RE.match(name))


def _temp_entries(folder: Path) -> list[Path]:
    """mosaic temp entries at the top of ``folder`` and anywhere inside the folders mosaic owns."""
    found = [p for p in _listdir(folder) if is_temp_name(p.name)]
    for sub in OWNED_FOLDERS:
        root = folder / sub
        if not root.is_dir() or root.is_symlink():
            continue
        for dirpath, dirnames, filenames in os.walk(root):  # os.walk shrugs off folders renamed mid-walk
            for name in list(dirnames):
                if is_temp_name(name):
                    dirnames.remove(name)  # what is inside a temp folder goes with it
                    found.append(Path(dirpath, name))
            found += [Path(dirpath, name) for name in filenames if is_temp_name(name)]
    return found


def _listdir(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def sweep_temp(folder: Path, *, min_age_s: float = 24 * 3600) -> int:
    """Remove temp files/folders left by killed mosaic writers under a data folder; returns how many.

    Only names mosaic creates (``.mosaic-tmp.<name>.<pid>@<host>.<random>.tmp``) are candidates, and
    only at the top of ``folder`` and inside the folders mosaic writes (``OWNED_FOLDERS``), so a user's
    own ``.draft.tmp`` — even with ``data_dir: .`` — is never touched. Safe while other runs write:
    an entry is removed when the process that created it (same host, pid in its name) is gone, or
    when nothing in it changed for ``min_age_s`` seconds (entries from other hosts). ``min_age_s=0``
    removes every mosaic temp entry (only when no other writer can be running).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    found = _temp_entries(folder)
    now = time.time()
    n = 0
    for p in found:
        m = _TEMP_RE.match(p.name)
        if m is None:
            continue
        pid = int(m.group(1))
        dead = m.group(2) == _HOST and pid != os.getpid() and not _pid_alive(pid)
        if not (dead or min_age_s <= 0 or now - _newest_mtime(p) >= min_age_s):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n
