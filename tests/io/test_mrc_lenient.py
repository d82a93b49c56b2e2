"""MRC files RELION reads are read: an older header without the "MAP " string and with a zero
machine stamp (RELION takes it as little-endian) is read leniently, with one warning naming the
file and what was irregular; broken files are still refused."""

import warnings

import mrcfile
import numpy as np
import pytest

from cryopose.errors import InputError
from cryopose.io import open_stack, read_images, read_map, stack_shape
from cryopose.io.mrc import IrregularMRCHeader


def _old_header(path, data, voxel_size=1.0):
    """An MRC file as older writers left it: no "MAP " string (bytes 208–211) and a zero machine
    stamp (212–215), the rest MRC2014."""
    with mrcfile.new(path, overwrite=True) as mrc:
        mrc.set_data(data)
        mrc.voxel_size = voxel_size
    raw = bytearray(path.read_bytes())
    raw[208:216] = bytes(8)
    path.write_bytes(bytes(raw))
    return path


def test_an_older_header_is_read_with_one_warning(tmp_path):
    data = np.random.default_rng(0).normal(size=(5, 16, 16)).astype(np.float32)
    path = _old_header(tmp_path / "old.mrcs", data)
    with mrcfile.open(path, permissive=True) as mrc:  # the fixture is what it claims to be
        assert bytes(mrc.header.map) != b"MAP " and bytes(mrc.header.machst) == bytes(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert stack_shape(path) == (5, 16, 16)
        stack = open_stack(path)
        np.testing.assert_array_equal(read_images(stack, [4, 0, 2]), data[[4, 0, 2]])
        stack.close()
    ours = [w for w in caught if issubclass(w.category, IrregularMRCHeader)]
    assert len(ours) == 1 and len(caught) == 1, [str(w.message) for w in caught]
    message = str(ours[0].message)
    assert str(path) in message and "Map ID string not found" in message and "machine stamp" in message


def test_an_older_map_header_is_read(tmp_path):
    volume = np.random.default_rng(1).normal(size=(8, 8, 8)).astype(np.float32)
    path = _old_header(tmp_path / "old_map.mrc", volume, voxel_size=2.5)
    with pytest.warns(IrregularMRCHeader, match="old_map.mrc"):
        read, pixel_size = read_map(path)
    np.testing.assert_array_equal(read, volume)
    assert pixel_size == pytest.approx(2.5)


def test_broken_files_are_still_refused(tmp_path):
    data = np.zeros((4, 16, 16), dtype=np.float32)
    truncated = _old_header(tmp_path / "truncated.mrcs", data)
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(InputError, match="truncated MRC file"), warnings.catch_warnings():
        warnings.simplefilter("ignore", IrregularMRCHeader)
        stack_shape(truncated)
    garbage = tmp_path / "garbage.mrcs"
    garbage.write_bytes(b"not an MRC file at all" * 100)
    with pytest.raises(InputError, match="not a valid MRC file"):
        open_stack(garbage)
    bad_mode = _old_header(tmp_path / "mode.mrcs", data)
    raw = bytearray(bad_mode.read_bytes())
    raw[12:16] = (99).to_bytes(4, "little")  # mode 99: no data type
    bad_mode.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="not a valid MRC file"), warnings.catch_warnings():
        warnings.simplefilter("ignore", IrregularMRCHeader)
        stack_shape(bad_mode)
