"""MRC image stacks and 3D maps: checked opening, batched reading, atomic writing.

Stacks are opened as memory maps (a real half is 20–47 GB) and read in contiguous runs, never
whole. Every file goes through one header check (:func:`_mrc_layout`) that refuses a truncated
file, a bad header and complex-valued data (mode 3 or 4, which reading would silently cast to
real), so these errors surface as :class:`~cryopose.errors.InputError` naming the file, not as a
crash deep inside a reconstruction. Writers go through :func:`cryopose.io.atomic.atomic_write`.

Headers RELION reads are read too: an older header without the ``MAP `` string, or with a zero
or unknown machine stamp (RELION then assumes little-endian, as mrcfile's permissive mode does),
is read leniently with one warning per file naming what was irregular. Everything the data depend
on (mode, dimensions, file size) is still checked.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import sys
import warnings
from pathlib import Path

import mrcfile
import mrcfile.utils
import numpy as np

from ..errors import InputError
from .atomic import atomic_write

__all__ = [
    "open_stack",
    "stack_shape",
    "read_images",
    "release_pages",
    "StackWriter",
    "read_map",
    "write_map",
    "IrregularMRCHeader",
]

_COMPLEX_MRC_MODES = {3: "complex int16", 4: "complex float32"}

#: What mrcfile's strict mode refuses and RELION reads: the "MAP " string of newer headers is
#: missing, or the machine stamp is zero or unknown (taken as little-endian).
_TOLERATED = ("Map ID string not found", "machine stamp")

#: Files read leniently in this process (resolved paths): opened in mrcfile's permissive mode,
#: warned about once.
_LENIENT: set[str] = set()


class IrregularMRCHeader(UserWarning):
    """An MRC header RELION reads that the MRC2014 standard does not allow (read leniently)."""


def _header(path: Path):
    """``(header, irregular)``: the header of ``path`` read strictly (``irregular`` None), or
    leniently for what RELION tolerates (``irregular``: what mrcfile found wrong)."""
    try:
        with mrcfile.open(path, mode="r", header_only=True, permissive=False) as mrc:
            return mrc.header.copy(), None
    except Exception as err:  # mrcfile raises ValueError/OSError/EOFError for bad headers
        strict_error = err
    if not any(t in str(strict_error) for t in _TOLERATED):
        raise InputError(f"not a valid MRC file ({type(strict_error).__name__}: {strict_error})", path=path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with mrcfile.open(path, mode="r", header_only=True, permissive=True) as mrc:
                header = mrc.header.copy()
        except Exception as err:
            raise InputError(f"not a valid MRC file ({type(err).__name__}: {err})", path=path) from err
    messages = list(dict.fromkeys(str(w.message) for w in caught)) or [str(strict_error)]
    tolerated = [m for m in messages if any(t in m for t in _TOLERATED)]
    if len(tolerated) < len(messages):  # more wrong than RELION tolerates (an extended header that is not there...)
        raise InputError(f"not a valid MRC file ({'; '.join(messages)})", path=path)
    return header, "; ".join(messages)


def _permissive(path: Path) -> bool:
    return str(path.resolve()) in _LENIENT


def _mrc_layout(path: Path) -> tuple[tuple[int, ...], int]:
    """Data shape and the byte count the header promises; checks the header and the file size."""
    if not path.is_file():
        raise InputError("MRC file not found", path=path)
    header, irregular = _header(path)
    # Every stack and map is opened through here. Complex data (Fourier transforms) would be cast
    # to real when read, dropping the imaginary part with no more than a numpy warning: refused.
    mode = int(header.mode)
    if mode in _COMPLEX_MRC_MODES:
        raise InputError(
            f"MRC mode {mode} holds complex values ({_COMPLEX_MRC_MODES[mode]}); real-valued "
            f"images or maps expected (mode 0, 1, 2, 6 or 12)",
            path=path,
            where="header mode",
        )
    try:
        dtype = mrcfile.utils.data_dtype_from_header(header)
    except Exception as err:
        raise InputError(f"not a valid MRC file ({type(err).__name__}: {err})", path=path) from err
    dims = (int(header.nz), int(header.ny), int(header.nx))
    if min(dims) < 1:
        raise InputError(f"not a valid MRC file: header dimensions nz, ny, nx = {dims}", path=path)
    shape = mrcfile.utils.data_shape_from_header(header)
    expected = int(header.nbytes) + int(header.nsymbt) + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = path.stat().st_size
    if actual < expected:
        raise InputError(
            f"truncated MRC file: the header promises {' x '.join(map(str, dims))} values of "
            f"{dtype.name} (expected {expected} bytes) but the file has {actual} bytes",
            path=path,
        )
    if irregular and str(path.resolve()) not in _LENIENT:
        # Only now, when everything the data depend on has been checked: a refused file gets an
        # error, not a warning first.
        _LENIENT.add(str(path.resolve()))
        warnings.warn(
            f"{path}: irregular MRC header ({irregular}); read as RELION reads it (little-endian unless the "
            "stamp says otherwise)",
            IrregularMRCHeader,
            stacklevel=3,
        )
    return tuple(int(s) for s in shape), expected


def open_stack(path: str | Path):
    """Open an MRC stack read-only as a memory map; no image is read until it is indexed.

    Returns the :func:`mrcfile.mmap` object (``.data`` is a :class:`numpy.memmap`); close it when done.

    Raises:
        InputError: for a missing file, an invalid header, or a file shorter than its header
            promises (naming the expected and actual byte counts).
    """
    path = Path(path)
    _mrc_layout(path)
    try:
        with warnings.catch_warnings():  # a lenient file was warned about once, by _mrc_layout
            warnings.simplefilter("ignore")
            return mrcfile.mmap(path, mode="r", permissive=_permissive(path))
    except Exception as err:
        raise InputError(f"cannot memory-map the MRC file ({type(err).__name__}: {err})", path=path) from err


def release_pages(stack) -> None:
    """Drop the pages of an open stack's memory map from this process's resident memory.

    Pages read through a memory map stay mapped (and count in the process's resident size, and
    in a Slurm job's memory) until the map is closed, so a pass over a 20–47 GB half would grow to
    the stack's size. Called after each batch, this keeps a reader's memory at its batch: the pages
    leave this process (``madvise(MADV_DONTNEED)``; the file is read-only) but stay in the system's
    page cache. A no-op for anything that is not a memory map.
    """
    data = getattr(stack, "data", stack)
    mapping = getattr(data, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def stack_shape(path: str | Path) -> tuple[int, int, int]:
    """``(n, ny, nx)`` of an MRC stack from its header (a single 2D image gives ``n = 1``).

    The header and the file size are checked as in :func:`open_stack`; no data is read.
    """
    path = Path(path)
    shape, _ = _mrc_layout(path)
    if len(shape) == 2:
        return (1, *shape)
    if len(shape) != 3:
        raise InputError(f"expected an image stack, got data of shape {shape}", path=path)
    return shape


def _stack_name(stack) -> str | None:
    return getattr(getattr(stack, "_iostream", None), "name", None)


def read_images(stack, indices) -> np.ndarray:
    """Images ``indices`` (0-based, any order, repeats allowed) of an open stack, as float32.

    The sorted unique indices are read in contiguous runs, one slice of the memory map each, so a
    batch of neighbouring particles costs one read and the stack is never loaded whole.

    Args:
        stack: an object from :func:`open_stack` (or anything with a ``.data`` array, or an array).
        indices: integer indices.

    Returns:
        ``(len(indices), S, S)`` float32, in the requested order.

    Raises:
        InputError: for an index outside the stack, naming the index and the stack length.
    """
    data = getattr(stack, "data", stack)
    if data.ndim == 2:
        data = data[None]
    idx = np.asarray(indices).reshape(-1)
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"read_images: indices must be integers, got {idx.dtype}")
    idx = idx.astype(np.int64)
    n = data.shape[0]
    outside = (idx < 0) | (idx >= n)
    if outside.any():
        bad = int(idx[outside][0])
        raise InputError(
            f"image index {bad} (0-based) is outside the stack of {n} images (valid: 0 to {n - 1})",
            path=_stack_name(stack),
        )
    uniq, inverse = np.unique(idx, return_inverse=True)
    out = np.empty((len(uniq),) + data.shape[1:], dtype=np.float32)
    if len(uniq):
        starts = np.concatenate([[0], np.flatnonzero(np.diff(uniq) != 1) + 1])
        ends = np.concatenate([starts[1:], [len(uniq)]])
        for a, b in zip(starts, ends):
            out[a:b] = data[uniq[a] : uniq[a] + (b - a)]
    return out[inverse.reshape(-1)]


class StackWriter:
    """Write an MRC image stack of known size batch by batch, through a memory map, atomically.

    ::

        with StackWriter(path, n_images, box_size, pixel_size) as w:
            w.write(0, images[:256])
            w.write(256, images[256:])

    The file is made with :func:`mrcfile.new_mmap` under a temporary name; on a clean exit the
    pixel size (voxel size) and the header statistics (accumulated while writing) are set and the
    file is renamed to ``path``. Every image must have been written by then (else ValueError). On
    an exception the temporary file is removed and nothing appears at ``path``.
    """

    def __init__(self, path: str | Path, n_images: int, box_size: int, pixel_size: float, dtype=np.float32):
        self.path = Path(path)
        if int(n_images) < 1 or int(box_size) < 1:
            raise ValueError(f"StackWriter: need n_images >= 1 and box_size >= 1, got {n_images}, {box_size}")
        if not (np.isfinite(pixel_size) and pixel_size > 0):
            raise ValueError(f"StackWriter: pixel_size must be positive, got {pixel_size}")
        self.shape = (int(n_images), int(box_size), int(box_size))
        self.pixel_size = float(pixel_size)
        self.dtype = np.dtype(dtype)
        self.mode = mrcfile.utils.mode_from_dtype(self.dtype)  # ValueError for a dtype MRC cannot store
        self._ctx = None
        self._mrc = None
        self._written = np.zeros(self.shape[0], bool)
        self._overlap = False
        self._stats = [np.inf, -np.inf, 0.0, 0.0]  # min, max, sum, sum of squares

    def __enter__(self) -> StackWriter:
        self._ctx = atomic_write(self.path)
        tmp = self._ctx.__enter__()
        try:
            self._mrc = mrcfile.new_mmap(tmp, shape=self.shape, mrc_mode=self.mode, overwrite=True)
            # The new file is sparse: on a full disk a store into the memory map kills the process
            # with SIGBUS. Reserving its blocks now turns that into an ENOSPC error before any work.
            fd = os.open(tmp, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
            finally:
                os.close(fd)
            self._mrc.set_image_stack()
            self._mrc.voxel_size = self.pixel_size
        except BaseException:
            self._close_quietly()
            self._ctx.__exit__(*sys.exc_info())
            raise
        return self

    def write(self, start: int, images: np.ndarray) -> None:
        """Store ``images`` (``(k, S, S)``) as images ``start`` .. ``start + k - 1`` (0-based)."""
        if self._mrc is None:
            raise RuntimeError("StackWriter.write outside its with-block")
        images = np.asarray(images)
        if images.ndim == 2:
            images = images[None]
        start = int(start)
        if images.shape[1:] != self.shape[1:] or start < 0 or start + len(images) > self.shape[0]:
            raise ValueError(
                f"StackWriter.write: images of shape {images.shape} at index {start} do not fit "
                f"the stack {self.shape} ({self.path})"
            )
        if len(images) == 0:
            return
        images = images.astype(self.dtype, copy=False)
        lo, hi = images.min(), images.max()
        if not (np.isfinite(lo) and np.isfinite(hi)):
            raise ValueError(
                f"StackWriter.write: non-finite values in images {start}..{start + len(images) - 1} ({self.path})"
            )
        self._mrc.data[start : start + len(images)] = images
        if self._written[start : start + len(images)].any():
            self._overlap = True  # statistics are recomputed from the file at the end
        self._written[start : start + len(images)] = True
        s = self._stats
        wide = images.astype(np.float64)
        s[0], s[1] = min(s[0], float(lo)), max(s[1], float(hi))
        s[2] += float(wide.sum())
        s[3] += float(np.square(wide).sum())

    def _close_quietly(self) -> None:
        if self._mrc is not None:
            with contextlib.suppress(Exception):
                self._mrc.close()
            self._mrc = None

    def _recompute_stats(self) -> None:
        data = self._mrc.data
        s = [np.inf, -np.inf, 0.0, 0.0]
        for a in range(0, self.shape[0], 1024):
            chunk = np.asarray(data[a : a + 1024], dtype=np.float64)
            s = [min(s[0], chunk.min()), max(s[1], chunk.max()), s[2] + chunk.sum(), s[3] + np.square(chunk).sum()]
        self._stats = s

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._close_quietly()
            return self._ctx.__exit__(exc_type, exc, tb)
        try:
            missing = np.flatnonzero(~self._written)
            if len(missing):
                raise ValueError(
                    f"StackWriter: {len(missing)} of {self.shape[0]} images were never written "
                    f"(first: index {missing[0]}); {self.path} not created"
                )
            if self._overlap:
                self._recompute_stats()
            lo, hi, total, sq = self._stats
            count = float(np.prod(self.shape))
            mean = total / count
            header = self._mrc.header
            header.dmin, header.dmax, header.dmean = lo, hi, mean
            header.rms = np.sqrt(max(sq / count - mean * mean, 0.0))
            self._mrc.flush()
            self._mrc.close()
            self._mrc = None
        except BaseException:
            self._close_quietly()
            self._ctx.__exit__(*sys.exc_info())
            raise
        return self._ctx.__exit__(None, None, None)


def read_map(path: str | Path) -> tuple[np.ndarray, float]:
    """A cubic 3D map as float32 ``(D, D, D)`` indexed ``[z, y, x]``, and its pixel size in Å.

    The pixel size is the header's voxel size (x); it is 0.0 when the header does not set one.
    """
    path = Path(path)
    shape, _ = _mrc_layout(path)
    if len(shape) != 3 or len(set(shape)) != 1:
        raise InputError(f"expected a cubic 3D map, got data of shape {shape}", path=path)
    try:
        with warnings.catch_warnings():  # a lenient file was warned about once, by _mrc_layout
            warnings.simplefilter("ignore")
            with mrcfile.open(path, mode="r", permissive=_permissive(path)) as mrc:
                return np.array(mrc.data, dtype=np.float32), float(mrc.voxel_size.x)
    except Exception as err:
        raise InputError(f"not a readable MRC map ({type(err).__name__}: {err})", path=path) from err


def write_map(path: str | Path, volume: np.ndarray, pixel_size: float) -> None:
    """Write a 3D map (``[z, y, x]``) as float32 with its pixel size (the voxel size), atomically."""
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3:
        raise ValueError(f"write_map: expected a 3D volume, got shape {volume.shape}")
    with atomic_write(path) as tmp:
        with mrcfile.new(tmp, overwrite=True) as mrc:
            mrc.set_data(volume)
            mrc.voxel_size = float(pixel_size)
