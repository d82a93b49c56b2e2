"""Where a leaderboard row comes from: versions, parameters, data, machine and judge.

Every evaluation (``metrics.json``, block ``provenance``) and every model record (``model.json``,
block ``provenance``) says what made it, so that two leaderboards, e.g. a cluster run and a laptop
run, can be merged (:func:`cryopose.leaderboard.merge_leaderboards`) and rows that are not
comparable are refused rather than averaged together:

* :func:`cryopose_version`: the package version, with the git commit when cryopose runs from a
  git checkout (``0.1.0+git.1a2b3c4d5e6f``, ``.dirty`` when tracked files differ from it);
* :func:`method_version`: a built-in method's version is cryopose's (with its commit), a plugin's is
  its distribution's (``cryopose-svd-regressor 0.1.0``; the origin comes from
  :func:`cryopose.methods.method_origin`);
* :func:`params_hash`: a short sha256 of a parameters dict written as canonical JSON (sorted keys,
  no spaces), the same for the same values whatever their order;
* :func:`entry_fingerprint`: a short sha256 of an entry's content, cheap on a 40 GB entry (what
  :func:`entry_fingerprint` reads is listed there);
* :func:`machine`: the machine, without its host name (CPU model and cores, GPU, torch version);
* :func:`judge_version`: what must be equal for two rows' metrics to be comparable.

This module imports no other cryopose module (the methods registry and the judge both use it); it
imports torch only inside :func:`machine`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path

__all__ = [
    "JUDGE_VERSION",
    "cryopose_version",
    "git_commit",
    "method_version",
    "params_hash",
    "arrays_hash",
    "entry_fingerprint",
    "machine",
    "judge_version",
    "evaluation_provenance",
]

#: The version of the judge's definitions (metrics, masks, FSC binning, the protocol): raise it
#: whenever a change to :mod:`cryopose.evaluate` or :mod:`cryopose.metrics` changes the numbers an
#: evaluation writes for the same predictions. Rows of different judge versions are never merged.
JUDGE_VERSION = 1

#: How many hexadecimal digits of a sha256 the short hashes keep (64 bits).
HASH_DIGITS = 16
#: Bytes read from the start and from the end of each stack file by :func:`entry_fingerprint`.
SAMPLE_BYTES = 4096


@functools.cache
def git_commit() -> str | None:
    """The commit of the git checkout cryopose runs from (12 digits, ``.dirty`` appended when
    tracked files differ from it), or ``None`` when it is installed rather than run from a
    checkout, or git is missing or slow (a 5 s limit): never an error."""
    package = Path(__file__).resolve().parent
    root = package.parent.parent  # <checkout>/src/cryopose
    if package.parent.name != "src" or not (root / ".git").exists():
        return None
    try:
        run = functools.partial(subprocess.run, cwd=root, capture_output=True, text=True, timeout=5, check=False)
        head = run(["git", "rev-parse", "--short=12", "HEAD"])
        if head.returncode != 0 or not head.stdout.strip():
            return None
        dirty = run(["git", "diff", "--quiet", "HEAD", "--"]).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + (".dirty" if dirty else "")


def cryopose_version() -> str:
    """``__version__``, with ``+git.<commit>`` when cryopose runs from a git checkout."""
    from . import __version__

    commit = git_commit()
    return f"{__version__}+git.{commit}" if commit else __version__


def method_version(origin: str | None) -> str | None:
    """A method's version from its origin (:func:`cryopose.methods.method_origin`): a built-in's
    (``"cryopose <version>"``) is cryopose's with its commit, a plugin's the distribution's
    ``"<name> <version>"`` as it is; ``None`` stays ``None`` (not a registered method)."""
    if origin is None:
        return None
    if origin.split(" ")[0] == "cryopose":
        return f"cryopose {cryopose_version()}"
    return origin


def _short_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:HASH_DIGITS]


def params_hash(params: dict | None) -> str | None:
    """A short sha256 of ``params`` as canonical JSON (keys sorted at every level, no whitespace,
    non-ASCII kept; a value JSON cannot write, such as a path, as its ``str``). ``None`` for ``None``.
    Equal values give equal hashes whatever the keys' order; ``1`` and ``1.0`` differ (a method's
    parameters dataclass gives each field one type)."""
    if params is None:
        return None
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return _short_sha256(text.encode("utf-8"))


def arrays_hash(arrays: list) -> str:
    """A short sha256 of numeric arrays (numpy, torch on the CPU, or ``None``): each one's dtype,
    shape and bytes, in the order given. A submission's parameters are its poses: the same poses
    give the same hash whatever file, path, row order or writer's timestamp they came in."""
    import numpy as np

    digest = hashlib.sha256()
    for array in arrays:
        if array is None:
            digest.update(b"none;")
            continue
        values = np.ascontiguousarray(np.asarray(array))
        digest.update(f"{values.dtype.str}{values.shape};".encode())
        digest.update(values.tobytes())
    return digest.hexdigest()[:HASH_DIGITS]


def _stack_sample(path: Path) -> bytes:
    """A stack's name, size and its first and last :data:`SAMPLE_BYTES` (the MRC header and data)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(SAMPLE_BYTES)
        fh.seek(max(size - SAMPLE_BYTES, 0))
        tail = fh.read(SAMPLE_BYTES)
    return f"{path.name}:{size}:".encode() + head + tail


def entry_fingerprint(entry) -> str:
    """A short sha256 of what an entry's evaluation reads: its name, symmetry, box and pixel size,
    each half's STAR file (every byte), each stack file's name, size and first and last 4 KiB, and
    the mask (every byte) when it has one.

    It follows the ground-truth cache's record (:func:`cryopose.evaluate.ground_truth_maps`), which
    also reads the STAR files whole and only the stacks' sizes, but leaves out the stacks'
    modification times that the cache uses: a copy of an entry on another machine has other times
    and is the same entry. Reading a few KiB of each stack keeps it cheap on a 40 GB entry; the
    price is that an edit inside a stack that changes neither its size, its header nor its ends
    goes unseen (the STAR file, which holds every pose, CTF and image name, is read whole).
    """
    digest = hashlib.sha256()
    digest.update(f"{entry.name}\n{entry.symmetry}\n{entry.box_size}\n{entry.pixel_size}\n".encode())
    stacks: list[Path] = []
    for h in entry.halves:
        digest.update(entry.star_path(h).read_bytes())
        stacks += [s for s in entry.stack_files(h) if s not in stacks]
    for stack in stacks:
        digest.update(_stack_sample(Path(stack)))
    mask = getattr(entry, "mask_path", None)
    if mask is not None and Path(mask).is_file():
        digest.update(b"mask:" + Path(mask).read_bytes())
    return digest.hexdigest()[:HASH_DIGITS]


def _cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else :func:`platform.processor`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


@functools.cache
def machine() -> str:
    """The machine, without its host name: ``"<CPU model> ×<cores> (<OS> <arch>); GPU: <name>
    [×n]; torch <version>"`` (``GPU: none`` when torch sees no CUDA device; the torch part left
    out when torch cannot be imported). The cores are those this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 0
    parts = [f"{_cpu_model()} ×{cores} ({platform.system()} {platform.machine()})"]
    try:
        import torch
    except ImportError:
        return parts[0]
    gpu = "none"
    try:
        if torch.cuda.is_available():
            n = torch.cuda.device_count()
            gpu = torch.cuda.get_device_name(0) + (f" ×{n}" if n > 1 else "")
    except Exception:  # noqa: BLE001 - a broken driver is described, not raised
        gpu = "unavailable"
    parts += [f"GPU: {gpu}", f"torch {torch.__version__}"]
    return "; ".join(parts)


def judge_version(
    backend: str, pad: int, use_pred_confidence: bool, cesped_compatible: bool = False, scheme: str | None = None
) -> str:
    """What must be equal for two evaluations' metrics to be comparable:
    ``"judge <JUDGE_VERSION>; <backend>; pad <pad>; <weighted|unweighted>[; cesped]"``.

    The backend is ``torch:<scheme>`` (the torch reconstruction's two schemes make different maps,
    as the ground-truth cache also says) or ``relion``; ``weighted`` when the predicted confidences
    weight the maps; ``cesped`` for CESPED's definitions (``--cesped-compatible``). Left out: the
    RELION and torch versions (they change the last digits, not the definitions; the machine
    column names torch's) and cryopose's own version (the judge's definitions are
    :data:`JUDGE_VERSION`, raised when they change).
    """
    backend_id = f"torch:{scheme}" if backend == "torch" and scheme else backend
    text = f"judge {JUDGE_VERSION}; {backend_id}; pad {pad}; {'weighted' if use_pred_confidence else 'unweighted'}"
    return text + ("; cesped" if cesped_compatible else "")


def evaluation_provenance(
    entry, backend: str, pad: int, use_pred_confidence: bool, cesped_compatible: bool, scheme: str | None
) -> dict:
    """The evaluation's part of ``metrics.json``'s ``provenance`` block: ``cryopose_version``,
    ``judge_version``, ``entry_fingerprint`` and ``evaluate_machine``."""
    return {
        "cryopose_version": cryopose_version(),
        "judge_version": judge_version(backend, pad, use_pred_confidence, cesped_compatible, scheme),
        "entry_fingerprint": entry_fingerprint(entry),
        "evaluate_machine": machine(),
    }
