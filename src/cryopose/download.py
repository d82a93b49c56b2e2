"""Download the real CESPED entries from Zenodo into the benchmark layout, resumably.

Each entry is two Zenodo records (one per half) plus a shared mask record. A record lists its
files with sizes and md5 checksums (``GET <base>/api/records/<id>``); a half's record holds
``particles_{h}.star``, ``info_{h}.json`` and the stack split into raw byte chunks
``particles_{h}.mrcs.chunk_0..N`` (chunk 0 carries the MRC header) that are concatenated in
numeric order.

Guarantees:

* every file is written as ``<name>.part`` and renamed only once its size and md5 match the
  record; a ``.part`` left by an interruption is resumed at its last byte with an HTTP Range
  request (and restarted from zero when the server ignores the range or the part is longer than
  the file), so no byte is fetched twice and nothing is appended to a file of unknown content;
* transient failures (connection cut, timeout, HTTP 5xx/429) are retried with exponential backoff,
  each retry resuming where the last one stopped; a wrong checksum, a file missing from the record
  or on the server, and an unreachable server are clear errors naming the record and file;
* an entry appears under its final name only when complete: it is assembled in
  ``<out>/.download/<entry>/`` (which keeps the verified files for the next attempt) and renamed.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from .errors import InputError

__all__ = ["CESPED_RECORDS", "MASK_RECORD", "ZENODO", "RemoteFile", "record_files", "download_file", "download_entry"]

ZENODO = "https://zenodo.org"
#: Zenodo record ids of each entry's halves, as CESPED published them (``cryopose download --list``);
#: the paper's EMPIAR 10647 is deposited as 10648 (README, "Running the real CESPED entries").
CESPED_RECORDS: dict[str, tuple[int, int]] = {
    "TEST": (10998049, 10998591),  # a subset of 11120
    "10166": (8353634, 8353702),
    "10786": (8352275, 8352281),
    "10280": (8353722, 8353737),
    "11120": (8352296, 8352300),
    "10648": (8387534, 8390711),
    "10409": (8386582, 8386660),
    "10374": (8386774, 8386881),
}
#: The record holding every entry's ``<entry>_mask.mrc``.
MASK_RECORD = 11092291
#: Entries whose mask is another entry's.
MASK_OF = {"TEST": "11120"}

_BLOCK = 1 << 20
_CHUNK = re.compile(r"^particles_([01])\.mrcs\.chunk_(\d+)$")


class TransientError(Exception):
    """A failure worth retrying (connection cut, timeout, server busy)."""


@dataclass(frozen=True)
class RemoteFile:
    record: int
    key: str
    size: int
    md5: str
    url: str


def _open(url: str, timeout: float, offset: int = 0):
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code in (429, 500, 502, 503, 504):
            raise TransientError(f"HTTP {err.code} from {url}") from err
        if err.code == 404:
            raise InputError(f"not found on the server (HTTP 404): {url}", where="download") from err
        raise InputError(f"HTTP {err.code} {err.reason} from {url}", where="download") from err
    except (urllib.error.URLError, TimeoutError, OSError, http.client.HTTPException) as err:
        raise TransientError(f"cannot reach {url} ({getattr(err, 'reason', err)})") from err


def record_files(
    record: int, base_url: str = ZENODO, timeout: float = 60.0, retries: int = 5, backoff: float = 2.0
) -> dict[str, RemoteFile]:
    """``{key: RemoteFile}`` of a Zenodo record (``GET <base>/api/records/<id>``), retried with
    backoff; :class:`InputError` when the server stays unreachable."""
    url = f"{base_url}/api/records/{record}"
    for attempt in range(retries + 1):
        try:
            with _open(url, timeout) as response:
                body = response.read()
            break
        except (TransientError, OSError, http.client.HTTPException) as err:
            if attempt == retries:
                raise InputError(
                    f"{err}; gave up after {retries} retries: offline, or the server is down?", where=f"record {record}"
                ) from err
            time.sleep(backoff * 2**attempt)
    try:
        data = json.loads(body)
        files = {}
        for f in data["files"]:
            algo, _, digest = f["checksum"].partition(":")
            if algo != "md5" or not digest:
                raise ValueError(f"checksum {f['checksum']!r} is not md5:<hex>")
            key = f["key"]
            files[key] = RemoteFile(
                record, key, int(f["size"]), digest.lower(), f"{base_url}/records/{record}/files/{key}"
            )
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(
            f"unexpected record format ({err}); expected files[] with key, size, checksum", path=url
        ) from err
    return files


def _md5(path: Path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "md5")


def _fetch_once(remote: RemoteFile, part: Path, timeout: float, bar) -> None:
    """Append the missing bytes of ``remote`` to ``part`` (one HTTP request)."""
    have = part.stat().st_size if part.exists() else 0
    if have > remote.size:  # not a prefix of this file: start again
        part.unlink()
        have = 0
    if have == remote.size:
        return
    with _open(remote.url, timeout, have) as response:
        status = getattr(response, "status", 200)
        if have and status != 206:  # the server ignored the range: the body is the whole file
            have = 0
        elif have:
            content_range = response.headers.get("Content-Range", "")
            match = re.match(r"bytes (\d+)-", content_range)
            if not match or int(match.group(1)) != have:
                raise TransientError(f"server answered range {content_range!r} to bytes={have}-")
        mode = "ab" if have else "wb"
        if bar is not None:
            bar.reset(total=remote.size)
            bar.update(have)
        # Unbuffered, and each block as it arrives (read1): what was received is on disk even if
        # the process is killed, so the next run resumes from there.
        with open(part, mode, buffering=0) as out:
            while True:
                try:
                    block = response.read1(_BLOCK)
                except (TimeoutError, OSError, http.client.HTTPException) as err:
                    raise TransientError(f"connection lost during {remote.key} ({type(err).__name__})") from err
                if not block:
                    break
                out.write(block)
                if bar is not None:
                    bar.update(len(block))
            out.flush()
            os.fsync(out.fileno())
    got = part.stat().st_size
    if got < remote.size:
        raise TransientError(f"{remote.key}: connection closed after {got} of {remote.size} bytes")
    if got > remote.size:
        part.unlink()
        raise TransientError(f"{remote.key}: received {got} bytes, the record says {remote.size}")


def download_file(
    remote: RemoteFile,
    dest: str | Path,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
    progress: bool = True,
) -> Path:
    """Download ``remote`` to ``dest`` through ``dest.part`` (resumed if present), verify size and
    md5, then rename. A ``dest`` already there with the right md5 is kept.

    Raises:
        InputError: checksum mismatch (the partial file is removed), file not on the server, or
            still failing after ``retries`` retries (the ``.part`` is kept for the next attempt).
    """
    dest = Path(dest)
    if dest.exists() and dest.stat().st_size == remote.size and _md5(dest).hexdigest() == remote.md5:
        return dest
    part = dest.with_name(dest.name + ".part")
    dest.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=remote.size, desc=remote.key, unit="B", unit_scale=True, disable=not progress)
    with bar:
        for attempt in range(retries + 1):
            try:
                _fetch_once(remote, part, timeout, bar if progress else None)
                break
            except TransientError as err:
                if attempt == retries:
                    raise InputError(
                        f"{err}; gave up after {retries} retries (run again to resume from "
                        f"{part.stat().st_size if part.exists() else 0} bytes; offline?)",
                        path=dest,
                        where=f"record {remote.record}",
                    ) from err
                time.sleep(backoff * 2**attempt)
    digest = _md5(part).hexdigest()
    if digest != remote.md5:
        part.unlink()
        raise InputError(
            f"md5 {digest} does not match the record's {remote.md5}; the download was removed, "
            f"run again to fetch it anew",
            path=dest,
            where=f"record {remote.record}, {remote.key}",
        )
    os.replace(part, dest)
    return dest


def _half_files(files: dict[str, RemoteFile], half: int, record: int) -> tuple[list[RemoteFile], list[RemoteFile]]:
    """The STAR and info files, and the stack chunks in numeric order, of one half's record."""
    plain = []
    for key in (f"particles_{half}.star", f"info_{half}.json"):
        if key not in files:
            raise InputError(
                f"record {record} has no {key} (files: {', '.join(sorted(files))})", where=f"record {record}"
            )
        plain.append(files[key])
    chunks = sorted(
        (int(m.group(2)), f) for k, f in files.items() if (m := _CHUNK.match(k)) and int(m.group(1)) == half
    )
    if not chunks:
        raise InputError(f"record {record} has no stack chunks particles_{half}.mrcs.chunk_*", where=f"record {record}")
    numbers = [n for n, _ in chunks]
    if numbers != list(range(len(numbers))):
        raise InputError(
            f"record {record}: stack chunks {numbers} are not 0..{len(numbers) - 1}", where=f"record {record}"
        )
    return plain, [f for _, f in chunks]


def _concatenate(chunks: list[Path], dest: Path, expected_size: int) -> None:
    part = dest.with_name(dest.name + ".part")
    with open(part, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as f:
                shutil.copyfileobj(f, out, _BLOCK)
        out.flush()
        os.fsync(out.fileno())
    if part.stat().st_size != expected_size:
        part.unlink()
        raise InputError(f"concatenated stack has {part.stat().st_size} bytes, the chunks {expected_size}", path=dest)
    os.replace(part, dest)


def download_entry(
    entry: str,
    out_dir: str | Path,
    base_url: str = ZENODO,
    retries: int = 5,
    backoff: float = 2.0,
    timeout: float = 60.0,
    keep_chunks: bool = False,
    progress: bool = True,
) -> Path:
    """Download one CESPED entry into ``out_dir/<entry>`` (the layout :class:`cryopose.Entry`
    reads) and return that folder; an entry already there is kept.

    Disk: a half's chunks and its concatenated stack coexist until the stack is verified (2× the
    stack, 40–94 GB, transiently); the chunks are then deleted unless ``keep_chunks``.
    """
    from .entry import Entry

    if entry not in CESPED_RECORDS:
        raise InputError(f"unknown CESPED entry {entry!r}; known: {', '.join(CESPED_RECORDS)}", where="entry")
    out_dir = Path(out_dir)
    target = out_dir / entry
    if target.exists():
        return target
    work = out_dir / ".download" / entry  # named as the entry, so it validates as one
    work.mkdir(parents=True, exist_ok=True)
    for half, record in enumerate(CESPED_RECORDS[entry]):
        stack = work / f"particles_{half}.mrcs"
        files = record_files(record, base_url, timeout, retries, backoff)
        plain, chunks = _half_files(files, half, record)
        for remote in plain:
            download_file(remote, work / remote.key, retries, backoff, timeout, progress)
        if not stack.exists():
            paths = [download_file(c, work / c.key, retries, backoff, timeout, progress) for c in chunks]
            _concatenate(paths, stack, sum(c.size for c in chunks))
            if not keep_chunks:
                for p in paths:
                    p.unlink()
    mask_key = f"{MASK_OF.get(entry, entry)}_mask.mrc"
    masks = record_files(MASK_RECORD, base_url, timeout, retries, backoff)
    if mask_key not in masks:
        raise InputError(f"mask record {MASK_RECORD} has no {mask_key}", where=f"record {MASK_RECORD}")
    download_file(masks[mask_key], work / f"{entry}_mask.mrc", retries, backoff, timeout, progress)
    Entry(work).validate()  # every file is there and consistent before the entry is published
    os.replace(work, target)
    try:
        work.parent.rmdir()  # .download/, when no other entry is in progress
    except OSError:
        pass
    return target
