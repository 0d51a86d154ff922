"""One run per workdir, and a workdir found fit for a run before the first step.

:func:`claim_workdir` is what :func:`bnjax_train.train.train_and_evaluate` holds for the life
of a run. On entering it checks the folder (a file where the folder or one of its entries
should be, a folder that cannot be written: :class:`WorkdirError`), creates it if needed and
takes an OS lock (``fcntl.flock`` on ``<workdir>/.lock``, released by the kernel on any exit,
crash included); a second process on the same workdir gets :class:`WorkdirBusyError` naming
the holder's PID. A run that fails during start-up (before its first step) leaves nothing
behind: the files and folders it created are removed, the workdir too if it made it.

A read-only workdir is claimed without a lock (nothing can write to it): it can only show a
finished run's result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator

__all__ = ["ENTRIES", "LOCK_NAME", "Claim", "DiskFullError", "WorkdirBusyError", "WorkdirError",
           "WorkdirLock", "check_workdir", "claim_workdir", "disk_full_error", "is_disk_full"]

#: The lock file of process 0 (process ``i > 0`` of a multi-host run: ``.lock.<i>``).
LOCK_NAME = ".lock"
#: What a run writes in its workdir, and whether each is a folder.
ENTRIES = {"checkpoints": True, "config.json": False, "metrics.jsonl": False,
           "curves.png": False, "folded": True, "damaged_checkpoints": True,
           "damaged_metrics": True}
#: What a run that fails during start-up removes again if it created it.
_STARTUP_ENTRIES = ("config.json", "metrics.jsonl", "checkpoints", "jax_cache")
_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)


class WorkdirError(ValueError):
    """A workdir that cannot hold a run (a file in the way, not writable, in use)."""


class WorkdirBusyError(WorkdirError):
    """Another process is running on this workdir."""


class DiskFullError(WorkdirError):
    """The disk holding the workdir is full (or the user's quota is used up)."""


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
#: How tensorstore (orbax's writer) says it, in the error it raises.
_NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", "[os_error_code='28']",
                   "[os_error_code='122']")


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` says that the disk is full (``ENOSPC``, ``EDQUOT``).

    Example:
      >>> import errno
      >>> is_disk_full(OSError(errno.ENOSPC, "No space left on device")), is_disk_full(
      ...     ValueError("RESOURCE_EXHAUSTED: ... [os_error_code='28']"))
      (True, True)
    """
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
        return True
    return any(text in str(error) for text in _NO_SPACE_TEXTS)


def _size(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"


def disk_full_error(folder: str, needed: int) -> DiskFullError:
    """The one message for a full disk: the folder, the space free and the space needed.

    Example:
      >>> import tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     print(disk_full_error(d, 3 * 2**20))  # doctest: +ELLIPSIS
      no space left on the disk of /...: ... free, the run needs about 3.0 MiB more (one ...
    """
    try:
        free = _size(shutil.disk_usage(folder).free)
    except OSError:
        free = "unknown"
    return DiskFullError(
        f"no space left on the disk of {folder}: {free} free, the run needs about "
        f"{_size(needed)} more (one checkpoint and its text files). Nothing written before "
        "is lost: free some space there (or move the folder to a larger disk) and run the "
        "same command to resume from the last complete checkpoint.")


def _writable(folder: str) -> bool:
    """Whether a file can be created in ``folder`` (tried: permission bits do not bind root)."""
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            return True
    except OSError as e:
        if e.errno in _READ_ONLY:
            return False
        raise


def check_workdir(workdir: str) -> None:
    """Raises :class:`WorkdirError` if ``workdir`` cannot be a run's folder.

    Found: ``workdir`` or one of its parents is a file; one of the run's entries
    (:data:`ENTRIES`) has the wrong kind (``checkpoints`` a file, ``metrics.jsonl`` a folder).
    Whether it can be written is found when it is claimed.

    Example:
      >>> import os, tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     open(os.path.join(d, "checkpoints"), "w").close()
      ...     check_workdir(d)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      bnjax_train.workdir.WorkdirError: --workdir ...: .../checkpoints is a file; a run keeps ...
    """
    path = os.path.abspath(workdir)
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        what = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise WorkdirError(f"--workdir {workdir}: {what}, not a folder; give a folder path "
                           "(it is created if needed).")
    for name, is_folder in ENTRIES.items():
        entry = os.path.join(path, name)
        if os.path.lexists(entry) and os.path.isdir(entry) != is_folder:
            kind = "a folder" if is_folder else "a file"
            raise WorkdirError(
                f"--workdir {workdir}: {entry} is {'a file' if is_folder else 'a folder'}; a "
                f"run keeps its {name} in {kind} there. Move it away or use another --workdir.")


class WorkdirLock:
    """An exclusive ``flock`` on ``<workdir>/.lock`` holding the owner's PID and host.

    Example:
      >>> import os, tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     first = WorkdirLock(d)
      ...     first.acquire()
      ...     try:
      ...         WorkdirLock(d).acquire()
      ...     except WorkdirBusyError as e:
      ...         print(f"in use by process {os.getpid()} on" in str(e))
      ...     first.release()
      True
    """

    def __init__(self, workdir: str, process_index: int = 0) -> None:
        self.workdir = workdir
        name = LOCK_NAME if process_index == 0 else f"{LOCK_NAME}.{process_index}"
        self.path = os.path.join(workdir, name)
        self._fd: int | None = None

    def _holder(self, fd: int) -> str:
        for _ in range(20):  # the holder writes its PID right after locking
            text = os.pread(fd, 200, 0).decode(errors="replace").strip()
            if text:
                return text
            time.sleep(0.05)
        return "unknown"

    def acquire(self) -> None:
        """Takes the lock or raises :class:`WorkdirBusyError` (``OSError`` if not writable)."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self._holder(fd)
                os.close(fd)
                raise WorkdirBusyError(
                    f"--workdir {self.workdir} is in use by process {holder} (lock file "
                    f"{self.path}); one run per workdir: wait for that run to end (or stop it "
                    "with Ctrl-C / kill PID: it saves and exits), or use another --workdir."
                ) from None
            try:  # the previous holder may have removed the file between our open and flock
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Removes the lock file and lets go of the lock (a no-op when not held)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


@dataclasses.dataclass
class Claim:
    """A claimed workdir: ``read_only`` if it could not be locked for writing.

    Call :meth:`start` once the run's first step is about to run: from then on a failure
    leaves the workdir as it is (it resumes).
    """

    workdir: str
    read_only: bool
    started: bool = False
    existed: frozenset[str] = frozenset()
    created: str | None = None

    def start(self) -> None:
        """Marks the end of start-up."""
        self.started = True

    def discard_new(self) -> None:
        """Removes what start-up created in the workdir (before :meth:`start` only)."""
        if self.started or self.read_only:
            return
        for name in _STARTUP_ENTRIES:
            path = os.path.join(self.workdir, name)
            if name in self.existed or not os.path.lexists(path):
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)


def _make_dirs(path: str) -> str | None:
    """Creates ``path`` and its missing parents; the topmost folder created, or None."""
    top, probe = None, path
    while not os.path.exists(probe):
        top, probe = probe, os.path.dirname(probe)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        if e.errno in _READ_ONLY:
            raise WorkdirError(f"--workdir {path}: cannot be created in {probe} "
                               f"({e.strerror}); give a folder you can write to.") from None
        raise
    return top


def _remove_created(top: str, path: str) -> None:
    """Removes the empty folders from ``path`` up to ``top`` (what :func:`_make_dirs` made)."""
    while True:
        try:
            os.rmdir(path)
        except OSError:
            return
        if path == top:
            return
        path = os.path.dirname(path)


@contextlib.contextmanager
def claim_workdir(workdir: str, *, process_index: int = 0,
                  is_main: bool = True) -> Iterator[Claim]:
    """Checks, creates and locks ``workdir`` for a run; undoes start-up on failure.

    Args:
      workdir: the run's folder (absolute).
      process_index: this process's index in a multi-host run (one lock file each).
      is_main: whether this process writes the text files (and removes them again).

    Raises:
      WorkdirError: see :func:`check_workdir`; or a folder that cannot be created.
      WorkdirBusyError: another process holds the workdir.

    Example:
      >>> import os, tempfile
      >>> with tempfile.TemporaryDirectory() as d:
      ...     run_dir = os.path.join(d, "run")
      ...     try:
      ...         with claim_workdir(run_dir) as claim:
      ...             open(os.path.join(run_dir, "config.json"), "w").close()
      ...             raise RuntimeError("failed during start-up")
      ...     except RuntimeError:
      ...         pass
      ...     os.path.exists(run_dir)
      False
    """
    check_workdir(workdir)
    created = _make_dirs(workdir)
    claim = Claim(workdir, read_only=False, existed=frozenset(os.listdir(workdir)),
                  created=created)
    lock = WorkdirLock(workdir, process_index)
    try:
        lock.acquire()
    except OSError as e:
        if e.errno not in _READ_ONLY:
            raise
        claim.read_only = True
    checkpoints = os.path.join(workdir, "checkpoints")
    if not claim.read_only and os.path.isdir(checkpoints) and not _writable(checkpoints):
        lock.release()
        raise WorkdirError(f"--workdir {workdir}: {checkpoints} is not writable; the run saves "
                           "its checkpoints there. Make it writable or use another --workdir.")
    try:
        yield claim
    except BaseException:
        if is_main:
            claim.discard_new()
        raise
    finally:
        lock.release()
        if created is not None and not claim.started:
            _remove_created(created, workdir)
