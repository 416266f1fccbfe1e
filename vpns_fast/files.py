"""Writing files the user keeps: atomically, never replacing one unless asked."""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
import warnings
from collections.abc import Callable, Iterator
from typing import BinaryIO

from vpns_fast.errors import UncheckedFileWarning

PARTIAL_PREFIX = ".tmp-"  # the temporary files of atomic_write: a write killed midway leaves one behind


class FileLockedError(ValueError):
    """Another process holds the lock :func:`file_lock` was asked not to wait for."""


def sweep_partial_writes(folder: str | os.PathLike) -> list[str]:
    """Delete what killed :func:`atomic_write` calls left in ``folder`` (its ``.tmp-*`` files); the caller
    makes sure no write into ``folder`` is under way (e.g. it holds the folder's lock). Returns the paths."""
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(folder):
            if entry.name.startswith(PARTIAL_PREFIX) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(entry.path)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _not_a_regular_file(path: str) -> str | None:
    """What ``path`` is where it exists and is neither a regular file nor a symbolic link (which is replaced as a
    link): "a directory", "a FIFO", "a character device", ...; else None."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISLNK(mode):
        return None
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((name for test, name in kinds if test(mode)), "a special file")


def never_replaced(path: str | os.PathLike) -> str | None:
    """Why :func:`atomic_write` never replaces ``path``, even when asked to (a folder, a FIFO, a device: what
    is there is not a regular file or a link), in words that start with the path; None where it may. Checked
    before "exists; pass --force": `--out /dev/null` had been told to pass --force, then refused for the device."""
    path = os.fspath(path)
    kind = _not_a_regular_file(path)
    if kind is None:
        return None
    return f"{path} is {kind}, not a regular file, and is never replaced (only files are): name a file to write"


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], overwrite: bool = False) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, fsync, then rename it over
    ``path``: a crash never leaves a half-written file, and an existing file is kept unless
    ``overwrite``. The one way vpns_fast writes what a user keeps."""
    path = os.fspath(path)
    problem = never_replaced(path)
    if problem is not None:
        # `--out /dev/null --force` replaced the machine's /dev/null by a regular file (an outside review)
        raise ValueError(problem)
    if os.path.lexists(path) and not overwrite:  # a symbolic link, even to nothing, is the user's too
        raise FileExistsError(f"{path} exists; pass overwrite=True (CLI: --force) to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix=os.path.basename(path), dir=folder)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the file gets the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path + ".lock"`` (POSIX ``flock``) for a
    read-merge-write of ``path`` shared by several processes; with ``wait=False`` a lock another
    process holds raises :class:`FileLockedError` at once instead of waiting for it. The lock file is opened read-only
    (``flock`` needs no write access, so a lock file another user created still serves). Where no
    lock can be had (no ``fcntl`` on Windows, no permission, a file system without locks) the
    caller goes on unlocked, with a warning: losing a concurrent entry beats losing the write."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    lock_path = os.fspath(path) + ".lock"
    for _ in range(8):
        try:
            os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
        except OSError:  # no folder to write in: the write that follows reports that itself
            yield
            return
        fd = None
        try:
            fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:  # no permission; ENOLCK on NFS without a lock daemon; or held, with wait=False
            if not wait and fd is not None and error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                os.close(fd)
                raise FileLockedError(f"{lock_path} is held by another process") from None
            if fd is not None:
                os.close(fd)
            warnings.warn(f"no lock for {path} ({error}); writing it unlocked", UncheckedFileWarning, stacklevel=3)
            yield
            return
        if _names_the_file(lock_path, fd):
            break
        # its holder removed the lock file (a failed job's own folder, run_files) between this process opening it
        # and locking it: a lock on the removed file excludes no one, so lock the path's file anew
        os.close(fd)
    else:
        warnings.warn(f"no lock for {path} (its lock file kept being replaced); writing it unlocked",
                      UncheckedFileWarning, stacklevel=3)
        yield
        return
    try:
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _names_the_file(path: str, fd: int) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        here, held = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)
