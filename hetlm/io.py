"""Crash-safe file output: write under a temporary name beside the target, fsync, rename.

A temporary file or folder is named ``.NAME.XXXXXXXX.tmp`` beside its target NAME. A folder that replaces
another is swapped with it in one step where the OS can (Linux's ``renameat2`` with ``RENAME_EXCHANGE``),
so the target path always holds a complete folder. Elsewhere the old folder is first renamed to
``.NAME.old`` and deleted once the new one is in place; if a crash comes between the two renames,
``recover`` (run before the next write of NAME, and by ``clean_up``) moves the old folder back.

``clean_up`` removes what crashed writers left. It is safe only while no other process writes those names:
callers hold a ``FileLock`` that every writer of them takes.

``disk_full_errors`` turns ENOSPC and EDQUOT (also as torch and safetensors wrap them) and EFBIG into one
HetlmError that names the file system, the path and the space needed.

Test hook: with ``HETLM_CRASH_AT=POINT`` (or ``POINT#N``) the process SIGKILLs itself the first (or Nth)
time it reaches crash point POINT, one of ``CRASH_POINTS``, to prove that a kill there loses nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hetlm.errors import HetlmError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt


def _default_file_mode() -> int:
    # Temporary files are created 0600 (and safetensors writes its own that way); output gets the mode a
    # plain open() would give.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


FILE_MODE = _default_file_mode()
DIR_MODE = FILE_MODE | ((FILE_MODE & 0o444) >> 2)

CRASH_POINTS = {
    "file-rename": "a finished file is about to take its target's name",
    "dir-rename": "a finished folder is about to take a free target name",
    "dir-exchange": "a finished folder is about to be swapped with the one it replaces",
    "dir-move-old": "without an exchange: the folder being replaced is about to move to .NAME.old",
    "dir-move-new": "without an exchange: the old folder is at .NAME.old, the new one about to take its place",
    "dir-remove-old": "the new folder is in place; the old one is about to be deleted",
}
_crash_counts: dict[str, int] = {}

# How long a lock is waited for before the holder is named in a refusal: others hold it for a moment only
# (hetlm eval saving eval.json), or for the whole of a long command.
LOCK_PATIENCE = 1.0


def crash_point(name: str) -> None:
    """SIGKILL this process here when HETLM_CRASH_AT names this point (the test hook in the module doc)."""
    wanted = os.environ.get("HETLM_CRASH_AT")
    if not wanted:
        return
    point, _, nth = wanted.partition("#")
    if point != name:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    if _crash_counts[name] == int(nth or 1):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as handle:
        os.fsync(handle.fileno())


def _new_temp(target: Path, folder: bool) -> Path:
    for _ in range(100):
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            if folder:
                os.mkdir(tmp, DIR_MODE)
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(target))


def remove_path(path: Path) -> None:
    """Delete a file, a symlink (never what it points to) or a folder; nothing when it is not there."""
    if os.path.islink(path) or (os.path.lexists(path) and not os.path.isdir(path)):
        Path(path).unlink(missing_ok=True)
    elif os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


def size_of(path: Path) -> int:
    """Bytes of a file, or of every file in a folder (symlinks not followed)."""
    if not os.path.isdir(path) or os.path.islink(path):
        return os.lstat(path).st_size if os.path.lexists(path) else 0
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary file path; on success it is fsynced and renamed onto ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp(target, folder=False)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        _fsync_file(tmp)
        crash_point("file-rename")
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: Path, text: str) -> None:
    atomic_write_bytes(target, text.encode("utf-8"))


def atomic_write_json(target: Path, obj: Any) -> None:
    atomic_write_text(target, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _load_renameat2() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a C library older than glibc 2.28
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _load_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step; False where the OS or the file system cannot."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def aside_path(target: Path) -> Path:
    """Where a folder being replaced waits while an exchange is not possible."""
    return target.with_name(f".{target.name}.old")


def recover(target: Path) -> str | None:
    """Finish an interrupted replacement of ``target``: put the old folder back if nothing took its place.

    Returns what was done, for the user, or None when there was nothing to do.
    """
    target = Path(target)
    old = aside_path(target)
    if not os.path.lexists(old):
        return None
    if os.path.lexists(target):
        size = size_of(old)
        remove_path(old)
        return f"removed {old} ({megabytes(size)}, replaced by {target.name})"
    os.replace(old, target)
    fsync_dir(target.parent)
    return f"restored {target} from {old.name} (its replacement was interrupted)"


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success its files are fsynced and it takes ``target``'s place.

    An existing ``target`` is replaced only by a complete folder, and at no instant does a crash lose both
    (see the module doc).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = _new_temp(target, folder=True)
    try:
        yield tmp
        for root, _, files in os.walk(tmp):
            for name in files:
                file = Path(root, name)
                os.chmod(file, FILE_MODE)
                _fsync_file(file)
            fsync_dir(Path(root))
        if not os.path.lexists(target):
            crash_point("dir-rename")
            os.replace(tmp, target)
            fsync_dir(target.parent)
        else:
            old = _swap_in(tmp, target)
            fsync_dir(target.parent)
            crash_point("dir-remove-old")
            remove_path(old)
    finally:
        remove_path(tmp)


def _swap_in(tmp: Path, target: Path) -> Path:
    """Put the finished folder ``tmp`` in ``target``'s place; returns where the old folder is now."""
    if _RENAMEAT2 is not None:
        crash_point("dir-exchange")
        if _exchange(tmp, target):
            return tmp
    old = aside_path(target)
    crash_point("dir-move-old")
    os.replace(target, old)
    crash_point("dir-move-new")
    os.replace(tmp, target)
    return old


def clean_up(folder: Path, names: str) -> list[str]:
    """Remove what interrupted writes of ``names`` (a regular expression) left in ``folder``; say what went.

    Temporary files and folders are deleted; a folder moved aside is put back or deleted (``recover``).
    Call it only while holding a lock that every writer of those names takes.
    """
    folder = Path(folder)
    try:
        entries = sorted(os.listdir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    # Temporary names, older versions' tempfile ones included, and folders moved aside.
    temp = re.compile(rf"\.(?:{names})[.-][a-z0-9_]{{8}}\.tmp")
    aside = re.compile(rf"\.(?P<name>{names})\.old")
    done = []
    for entry in entries:
        path = folder / entry
        if match := aside.fullmatch(entry):
            if (message := recover(folder / match.group("name"))) is not None:
                done.append(message)
        elif temp.fullmatch(entry):
            size = size_of(path)
            remove_path(path)
            done.append(f"removed {path} ({megabytes(size)})")
    return done


def megabytes(size: int) -> str:
    mb = size / 1e6
    return f"{mb:.0f} MB" if mb >= 100 else f"{mb:.1f} MB"


# --- locks ------------------------------------------------------------------------------------------------


class FileLock:
    """An exclusive lock held through the file ``path``, which the OS releases when the process ends, however.

    ``what`` names the locked thing in a refusal. The file is deleted on release (a killed holder's stays,
    unlocked, until the next holder releases it); a waiter that locked a file deleted meanwhile sees that
    it is no longer the one at ``path`` and tries again.
    """

    def __init__(self, path: Path, what: str, patience: float = LOCK_PATIENCE) -> None:
        self.path = Path(path)
        self.what = what
        self.patience = patience
        self.fd: int | None = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the lock, waiting up to ``patience`` seconds; HetlmError naming the holder when it stays taken."""
        deadline = time.monotonic() + self.patience
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
            except OSError as exc:
                raise HetlmError(f"cannot lock {self.what}: cannot create {self.path}: {exc.strerror or exc}") from None
            try:
                if _try_lock(fd, self.path) and _same_file(fd, self.path):
                    self.fd, fd = fd, None
                    self._write_holder()
                    return
            finally:
                if fd is not None:
                    os.close(fd)
            if time.monotonic() >= deadline:
                raise HetlmError(f"{self.what} is in use by another hetlm process{self._holder()}: wait for it to "
                                 f"finish, or stop it (it holds {self.path})")
            time.sleep(0.05)

    def release(self) -> None:
        if self.fd is None:
            return
        if _same_file(self.fd, self.path):
            with contextlib.suppress(OSError):
                self.path.unlink()
        os.close(self.fd)
        self.fd = None

    def _write_holder(self) -> None:
        holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)})
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            os.lseek(self.fd, 0, os.SEEK_SET)
            os.write(self.fd, (holder + "\n").encode("utf-8"))

    def _holder(self) -> str:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
            return f" (pid {int(holder['pid'])} on {holder['host']})"
        except (OSError, ValueError, KeyError, TypeError):
            return ""


def _try_lock(fd: int, path: Path) -> bool:
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if fcntl is None and exc.errno in (errno.EACCES, errno.EDEADLK):
            return False
        raise HetlmError(f"cannot lock {path}: {exc.strerror or exc}") from None


def _same_file(fd: int, path: Path) -> bool:
    # A lock file deleted and created anew between our open and our lock is not the lock others take.
    try:
        here, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


# --- full disks ---------------------------------------------------------------------------------------------

NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC), errno.EFBIG}
# safetensors reports an I/O error only in its message: "... (os error 28)" or "Os { code: 28, ... }".
_WRAPPED_ERRNO = re.compile(r"os error (\d+)|code: (\d+)")


def no_space_errno(exc: BaseException | None) -> int | None:
    """ENOSPC, EDQUOT or EFBIG when ``exc`` or an exception it came from reports one, else None.

    torch.save raises a RuntimeError ("unexpected pos ...") whose context is the OSError it met.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in NO_SPACE:
            return exc.errno
        if type(exc).__name__ == "SafetensorError" and (match := _WRAPPED_ERRNO.search(str(exc))):
            code = int(match.group(1) or match.group(2))
            if code in NO_SPACE:
                return code
        exc = exc.__cause__ or exc.__context__
    return None


def _existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def file_system(path: Path) -> str:
    """The file system ``path`` is on, as "SOURCE (mounted on MOUNT)" where the mount table says."""
    mount = _existing(path)
    while not os.path.ismount(mount) and mount.parent != mount:
        mount = mount.parent
    source = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mounts").read_text().splitlines():
            fields = line.split()
            # The mount table escapes blanks in paths as octal.
            if len(fields) > 1 and re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1]) == str(mount):
                source = fields[0]
    return f"{source} (mounted on {mount})" if source else f"the file system mounted on {mount}"


def disk_full_message(path: Path, code: int, needs: int | None = None) -> str:
    """"no space left on DEVICE writing PATH (needs about N MB, M MB free)" and its EDQUOT and EFBIG kin."""
    where = file_system(path)
    if code == errno.EFBIG:
        # A limit on one file's size: the free space does not matter.
        return f"file too large for {where} (or for the file-size limit, ulimit -f) writing {path}" + (
            f" (needs about {megabytes(needs)})" if needs else "")
    quota = "" if code == errno.ENOSPC else " (disk quota exceeded)"
    try:
        free = f"{megabytes(shutil.disk_usage(_existing(path)).free)} free"
    except OSError:
        return f"no space left on {where}{quota} writing {path}"
    size = f"needs about {megabytes(needs)}, {free}" if needs else f"needs more than the {free}"
    return f"no space left on {where}{quota} writing {path} ({size})"


@contextlib.contextmanager
def disk_full_errors(path: Path, needs: int | Callable[[], int | None] | None = None) -> Iterator[None]:
    """Turn a full disk or quota met while writing ``path`` into one HetlmError (exit 1) saying so.

    ``needs`` is the space the output takes, or a function that estimates it when the disk fills.
    """
    try:
        yield
    except HetlmError:
        raise
    except Exception as exc:
        code = no_space_errno(exc)
        if code is None:
            raise
        size = needs() if callable(needs) else needs
        raise HetlmError(disk_full_message(Path(path), code, size)) from exc


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
