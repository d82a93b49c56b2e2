"""Writing files and folders atomically, and cleaning up after writers that were killed.

Every writer in cryopose writes to a hidden temporary beside its destination and renames it into
place, so a crash or SIGTERM never leaves a half-written file under the final name and an earlier
output stays as it was. The temporaries carry the pid and host of the process that made them, so
the next writer of the same destination recognises and removes what a killed process (SIGKILL, a
power cut) left behind. Kept apart from the STAR and MRC formats: the same guarantees serve every
output (JSON, CSV, figures, whole entry folders).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from ..interrupt import uninterrupted

__all__ = ["WriteError", "atomic_write", "atomic_writes", "staged_folder", "temporary_folder", "is_temporary"]

_NO_SPACE = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}


class WriteError(OSError):
    """A write that failed for lack of space, reported with the destination it was meant for."""

    def __str__(self) -> str:
        return str(self.strerror)


def _write_error(err: OSError, what, kept: str) -> WriteError:
    """The lack-of-space error ``err`` as one message: what could not be written, why, what was kept."""
    return WriteError(err.errno, f"could not write {what}: {os.strerror(err.errno)}; {kept}")


# Temporaries: hidden, next to their destination, and named after it and after the process that
# made them (".<name>.tmp-<pid>-h<host>-<random>"), so that a later writer of the same destination
# recognises the leftovers of a process that died without cleaning up (SIGKILL, a power cut) and
# removes them. A process is taken for dead only on this host (a shared file system may hold the
# temporaries of a live process on another node) and when its pid is gone or now belongs to a
# process started after the temporary was last touched (pid reuse).
# The host tag is a 64-bit hash: with a short one, two nodes of a large cluster sharing a file
# system would take each other's live temporaries for a dead local process's.
_HOST = hashlib.blake2b(socket.gethostname().encode(), digest_size=8).hexdigest()
_TEMPORARY_TAIL = r"\.(tmp|old)-([0-9]+)-(?:h([0-9a-f]{16})-)?[0-9a-f]{8}"  # the host tag is absent in older names


def _temporary_name(base: str, kind: str = "tmp", suffix: str = "") -> str:
    return f".{base}.{kind}-{os.getpid()}-h{_HOST}-{secrets.token_hex(4)}{suffix}"


def is_temporary(name: str) -> bool:
    """Whether ``name`` is a file or folder name that cryopose's writers give their temporaries."""
    return re.search(_TEMPORARY_TAIL, name) is not None and name.startswith(".")


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), from /proc; ``None`` if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime ")
        )
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _owner_alive(pid: int, touched: float) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    started = _process_start(pid)
    # A 2 s margin: /proc's boot time is whole seconds and the clocks may have been stepped.
    return started is None or started <= touched + 2.0


def _remove_stale_temporaries(folder: Path, base: str, suffix: str = "") -> None:
    """Remove the temporaries that dead processes left for the destination ``folder/base+suffix``.

    A staged folder's ``.old-`` copy left by a process killed in the middle of its swap is put
    back when the destination is missing (the earlier output is restored, not lost)."""
    # One tail, or several: a writer writing into another's temporary (write_map into a file of
    # atomic_writes) makes "..name.tmp-<pid>-...tmp-<pid>-....mrc".
    pattern = re.compile(rf"^\.+{re.escape(base)}((?:{_TEMPORARY_TAIL})+){re.escape(suffix)}$")
    try:
        entries = [
            (e, re.findall(_TEMPORARY_TAIL, m.group(1))) for e in os.scandir(folder) if (m := pattern.match(e.name))
        ]
    except OSError:
        return
    for e, owners in sorted(entries, key=lambda item: item[1][0][0]):  # "old" before "tmp"
        kind = owners[0][0]
        if any(host and host != _HOST for _, _, host in owners):
            continue
        try:
            touched = e.stat(follow_symlinks=False).st_mtime
        except OSError:
            continue
        if any(_owner_alive(int(pid), touched) for _, pid, _ in owners):
            continue
        path = Path(e.path)
        if e.is_dir(follow_symlinks=False):
            kept = path / base
            target = folder / base
            if kind == "old" and kept.exists() and not target.exists() and not target.is_symlink():
                with contextlib.suppress(OSError):
                    os.replace(kept, target)
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def _make_temporary_folder(parent: Path, base: str, kind: str = "tmp") -> Path:
    """A new hidden folder ``parent/.base.<kind>-...``, made by os.mkdir: its permissions follow the
    umask like any folder's (mkdtemp's 0700 would survive the rename into place)."""
    while True:
        path = parent / _temporary_name(base, kind)
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; move it to ``path`` only if the body succeeds.

    The temporary name is hidden and keeps the suffix (``.particles_0.tmp-<pid>-h<host>-<hex>.star``)
    so libraries that look at the suffix behave. On success the file is fsync'ed and renamed over
    ``path`` with :func:`os.replace` (atomic on one file system). On any exception (SIGTERM
    included, see :mod:`cryopose.interrupt`) the temporary file is removed and an existing
    ``path`` is left untouched; temporaries of ``path`` that a killed process left are removed
    first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path.parent, path.stem, path.suffix)
    tmp = path.with_name(_temporary_name(path.stem, "tmp", path.suffix))
    try:
        try:
            yield tmp
        except OSError as err:
            if err.errno in _NO_SPACE and not isinstance(err, WriteError):
                raise _write_error(
                    err, path, f"the partial file was removed and the previous {path.name} (if any) is unchanged"
                ) from err
            raise
        if not tmp.is_file():
            raise FileNotFoundError(f"atomic_write: the block wrote nothing to {tmp} (destination {path})")
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    with contextlib.suppress(OSError):  # make the rename itself durable; not possible everywhere
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_writes(paths) -> Iterator[dict[str, Path]]:
    """:func:`atomic_write` for a group of files: yields ``{name: temporary path}`` (keyed by file
    name); nothing is renamed until the body has written them all, then they are renamed in
    reverse order of ``paths`` (the first is renamed last: put the file that marks completion
    first), with SIGTERM held back until the last rename so the group is never split. On any
    exception every temporary file is removed and no destination changes."""
    paths = [Path(p) for p in paths]
    if len({p.name for p in paths}) != len(paths):
        raise ValueError(f"atomic_writes: file names must be distinct, got {[p.name for p in paths]}")
    with contextlib.ExitStack() as guard:  # exits after the renames below
        with contextlib.ExitStack() as stack:
            temporaries = {p.name: stack.enter_context(atomic_write(p)) for p in paths}
            try:
                yield temporaries
            except OSError as err:
                if err.errno in _NO_SPACE:
                    names = ", ".join(p.name for p in paths)
                    raise _write_error(err, f"{names} in {paths[0].parent}", "no file there was changed") from err
                raise
            guard.enter_context(uninterrupted())


@contextlib.contextmanager
def staged_folder(target: str | Path) -> Iterator[Path]:
    """Yield an empty hidden sibling of ``target``; on success it replaces ``target`` (an existing
    folder is moved aside first and deleted after the swap), on any exception (SIGTERM included)
    it is deleted and ``target`` stays as it was. For outputs made of several files that must
    change together. The swap is not cut short by SIGTERM; the staging folders of a killed
    process are removed (and a target it had moved aside put back) by the next call."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(target.parent, target.name)
    work = _make_temporary_folder(target.parent, target.name, "tmp")
    try:
        yield work
        old = None
        try:
            with uninterrupted():
                if target.exists():
                    old = _make_temporary_folder(target.parent, target.name, "old")
                    os.replace(target, old / target.name)
                try:
                    os.replace(work, target)
                except BaseException:
                    if old is not None:
                        os.replace(old / target.name, target)
                    raise
        finally:
            # Outside the held section: deleting a large old copy (a preprocessed entry) takes long
            # enough for a scheduler to follow SIGTERM with SIGKILL; cut short, the next writer
            # removes what is left.
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(work, ignore_errors=True)
        if err.errno in _NO_SPACE:
            raise _write_error(
                err, target, f"the partial copy was removed and the earlier {target.name} (if any) is unchanged"
            ) from err
        raise
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


@contextlib.contextmanager
def temporary_folder(parent: str | Path, base: str) -> Iterator[Path]:
    """A hidden scratch folder ``parent/.base.tmp-...`` for the duration of the block, deleted on
    any exit (SIGTERM included); scratch folders of ``base`` that a killed process left in
    ``parent`` are removed first. Put it next to the output it serves, not in the system temp
    folder, so that it is on the same disk and found by the next run."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(parent, base)
    work = _make_temporary_folder(parent, base, "tmp")
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
