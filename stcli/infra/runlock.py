"""An exclusive lock on an output folder (a run folder of `st train`, the --out of `st sample`).

The lock is ``<folder>/.st.lock``, held by an exclusive ``flock`` and naming its holder
(host and PID).  The kernel drops the flock when the holder dies, so a lock file left by a
killed process is stale: the next run takes it over and says so.  Temporary files written
in a locked folder carry one name prefix, ``.st-tmp-``; none can belong to a live writer
once the lock is held, so `remove_temporaries` deletes them at start and on resume.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from stcli.infra.console import info
from stcli.infra.errors import UserError

LOCK = ".st.lock"
TMP_PREFIX = ".st-tmp-"


class RunLock:
    """`with RunLock(folder, "st train"):` holds `folder` exclusively (creating it if needed)."""

    def __init__(self, folder: str | Path, what: str):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK
        self.fd: int | None = None
        self.created = False

    def acquire(self) -> None:
        try:
            self.created = not self.folder.exists()
            self.folder.mkdir(parents=True, exist_ok=True)
            while True:  # retry if the file was replaced between open and flock
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = _read(fd)
                    os.close(fd)
                    raise UserError(f"{self.folder} is in use by another {holder.get('command', 'st')}"
                                    f" (PID {holder.get('pid', '?')} on host {holder.get('host', '?')});"
                                    f" wait for it to finish or use another folder") from None
                if _same_file(fd, self.path):
                    break
                os.close(fd)
            stale = _read(fd)
            if stale:
                info(f"taking over the stale lock of {self.folder} left by PID {stale.get('pid')} "
                     f"on host {stale.get('host')} (no longer running)")
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                      "command": self.what}).encode(), 0)
        except OSError as err:
            raise UserError(f"cannot write to the output folder {self.folder} (to lock it): {err}") from None
        self.fd = fd

    def release(self) -> None:
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding the flock
        os.close(self.fd)
        self.fd = None
        if self.created:  # a folder made for a run that wrote nothing goes again
            try:
                self.folder.rmdir()
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0)
        holder = json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        holder = {"pid": "?", "host": "?"}
    return holder if isinstance(holder, dict) else {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def temporary_name(name: str) -> str:
    """The name of a temporary file for `name`, unique to this process."""
    return f"{TMP_PREFIX}{name}.{os.getpid()}"


def remove_temporaries(folder: Path, depth: int = 1) -> int:
    """Delete the ``.st-tmp-*`` files and folders in `folder` (and `depth - 1` levels of
    subfolders); call only while holding the folder's lock.  Returns how many went."""
    removed = 0
    if not folder.is_dir():
        return 0
    for entry in folder.iterdir():
        if entry.name.startswith(TMP_PREFIX):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        elif depth > 1 and entry.is_dir() and not entry.is_symlink():
            removed += remove_temporaries(entry, depth - 1)
    return removed


def is_disk_full(err: BaseException) -> bool:
    """An OSError(ENOSPC/EDQUOT), or safetensors' wrapping of one."""
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return f"os error {errno.ENOSPC})" in str(err) or "No space left" in str(err)


@contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """A temporary path (``.st-tmp-*``) to write, renamed to `path` on success and removed on
    failure; a full disk is a UserError naming `path` and the bytes written so far."""
    tmp = path.with_name(temporary_name(path.name))
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        written = tmp.stat().st_size if tmp.exists() else 0
        if is_disk_full(err):
            raise UserError(f"no space left on the device to write {path} (it needs more than "
                            f"{written / 2**20:.1f} MiB free); what was written before is "
                            "kept: free some space and run the same command again") from None
        raise UserError(f"cannot write {path}: {err}") from None
    finally:
        tmp.unlink(missing_ok=True)
