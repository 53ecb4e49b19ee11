"""All-or-nothing outputs: nothing half-written is ever left where a user looks, and two runs
writing the same folder at once never mix: one writes it, the other is refused."""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from skimformer.errors import UserError


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold the lock on `out` for the block: a file `.NAME.lock` beside it, locked with `flock`
    and holding the writer's pid. Another holder means another run is writing `out`: refused
    at once. The kernel releases the lock of a process that dies, so a lock file a crash left
    behind never blocks; the file is removed when the block ends."""
    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 16, 0).decode(errors="replace").strip()
            os.close(fd)
            raise UserError(f"{out} is being written by another run{f' (pid {holder})' if holder else ''}: "
                            "wait for it to finish or choose another output") from None
        if _same_file(fd, path):
            break
        os.close(fd)  # the last holder removed this file as we opened it: lock the one there now
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


@contextlib.contextmanager
def atomic_folder(out: str | Path, replace: bool = True) -> Iterator[Path]:
    """A temporary folder beside `out`, moved into its place only if the block completes; on any
    failure it is removed and `out` is left as it was. `out` is locked (`exclusive`) throughout.
    An `out` that exists at the end is replaced, or refused when not `replace` (it appeared while
    the block ran: something else wrote it)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(out):
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        try:
            yield tmp
            tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
            if out.exists() and not replace:
                raise UserError(f"{out} appeared while this run was writing it: choose another output or pass --force")
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def atomic_file(out: str | Path) -> Iterator[Path]:
    """A temporary path beside `out`, renamed onto `out` (replacing it) only if the block
    completes; on any failure it is removed and `out` is left as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
