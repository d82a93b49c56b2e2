import io as stdio
import json
import warnings

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryopose.entry import Entry, resolve_entry
from cryopose.errors import InputError
from cryopose.io import (
    ParticleStar,
    StackNotFound,
    StackPathWarning,
    StackWriter,
    atomic_write,
    open_stack,
    parse_image_name,
    particles_with_optics,
    read_images,
    read_map,
    read_particles_star,
    resolve_stack_path,
    stack_shape,
    write_map,
    write_particles_star,
)

PX = 1.51338  # one CESPED entry's pixel size: never assume 1.5


def _optics(px=(PX,), size=16):
    n = len(px)
    return pd.DataFrame(
        {
            "rlnOpticsGroup": np.arange(1, n + 1),
            "rlnOpticsGroupName": [f"g{i}" for i in range(n)],
            "rlnImagePixelSize": list(px),
            "rlnImageSize": [size] * n,
            "rlnImageDimensionality": [2] * n,
            "rlnVoltage": [300.0] * n,
            "rlnSphericalAberration": [2.7] * n,
            "rlnAmplitudeContrast": [0.1] * n,
        }
    )


def _particles(n=5, stack="particles_0.mrcs", groups=None, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "rlnImageName": [f"{i + 1:06d}@{stack}" for i in range(n)],
            "rlnOpticsGroup": groups if groups is not None else [1] * n,
            "rlnAngleRot": rng.uniform(-180, 180, n),
            "rlnAngleTilt": rng.uniform(0, 180, n),
            "rlnAnglePsi": rng.uniform(-180, 180, n),
            "rlnOriginXAngst": rng.normal(0, 3, n),
            "rlnOriginYAngst": rng.normal(0, 3, n),
            "rlnDefocusU": rng.uniform(10000, 20000, n),
            "rlnDefocusV": rng.uniform(10000, 20000, n),
            "rlnDefocusAngle": rng.uniform(0, 180, n),
            "rlnMaxValueProbDistribution": rng.uniform(0, 1, n),
        }
    )


def _stack(path, n=5, box=16, px=PX):
    data = np.arange(n * box * box, dtype=np.float32).reshape(n, box, box)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(data)
        m.set_image_stack()
        m.voxel_size = px
    return data


def _entry(root, n=5, box=16, symmetry="C2"):
    root.mkdir(parents=True, exist_ok=True)
    for h in (0, 1):
        _stack(root / f"particles_{h}.mrcs", n, box)
        write_particles_star(
            root / f"particles_{h}.star", ParticleStar(_optics(size=box), _particles(n, f"particles_{h}.mrcs", seed=h))
        )
        (root / f"info_{h}.json").write_text(json.dumps({"symmetry": symmetry}))
    return Entry(root)


def _star_text(optics: pd.DataFrame | None, particles: pd.DataFrame) -> str:
    """A STAR file written by hand (no cryopose code), for inputs cryopose's writer would not make."""
    out = stdio.StringIO()
    for name, df in (("optics", optics), ("particles", particles)):
        if df is None:
            continue
        out.write(f"\ndata_{name}\n\nloop_\n")
        out.writelines(f"_{c} #{i}\n" for i, c in enumerate(df.columns, 1))
        for row in df.itertuples(index=False):
            out.write(" ".join(str(v) for v in row) + "\n")
    return out.getvalue()


# ----------------------------------------------------------------------------------------------
# STAR
# ----------------------------------------------------------------------------------------------


def test_relion31_round_trip_keeps_values_and_columns(tmp_path):
    parts = _particles()
    parts["rlnOriginXAngst"] = [1.234567891234, -1e-9, 3.0, 0.5, 1 / 3]  # beyond 6 decimals
    parts["rlnDefocusAngle"] = 0.0  # integral floats must stay floats
    parts["rlnRandomSubset"] = [1, 2, 1, 2, 1]
    parts["rlnMicrographName"] = "mics/a.mrc"  # an unknown column is kept as is
    star = ParticleStar(_optics(), parts)
    write_particles_star(tmp_path / "p.star", star)
    back = read_particles_star(tmp_path / "p.star")
    assert back.path == tmp_path / "p.star"
    assert list(back.particles.columns) == list(parts.columns)
    floats = [
        "rlnAngleRot",
        "rlnAngleTilt",
        "rlnAnglePsi",
        "rlnOriginXAngst",
        "rlnOriginYAngst",
        "rlnDefocusU",
        "rlnDefocusV",
        "rlnDefocusAngle",
        "rlnMaxValueProbDistribution",
    ]
    np.testing.assert_allclose(back.particles[floats].to_numpy(), parts[floats].to_numpy(), rtol=1e-12, atol=1e-15)
    assert all(back.particles[c].dtype == np.float64 for c in floats)
    assert back.particles["rlnRandomSubset"].tolist() == [1, 2, 1, 2, 1]
    assert back.particles["rlnMicrographName"].tolist() == ["mics/a.mrc"] * 5
    assert back.particles["rlnImageName"].tolist() == parts["rlnImageName"].tolist()
    pd.testing.assert_frame_equal(back.optics, _optics(), check_dtype=False)
    text = (tmp_path / "p.star").read_text()
    assert "data_optics" in text and "data_particles" in text
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


RELION30 = """
data_

loop_
_rlnImageName #1
_rlnAngleRot #2
_rlnAngleTilt #3
_rlnAnglePsi #4
_rlnOriginX #5
_rlnOriginY #6
_rlnDefocusU #7
_rlnDefocusV #8
_rlnDefocusAngle #9
_rlnVoltage #10
_rlnSphericalAberration #11
_rlnAmplitudeContrast #12
_rlnDetectorPixelSize #13
_rlnMagnification #14
000001@stack.mrcs 10.0 20.0 30.0 2.0 -1.0 15000 14000 5 300 2.7 0.1 5.0 25000
000002@stack.mrcs 11.0 21.0 31.0 -3.0 0.5 15000 14000 5 300 2.7 0.1 5.0 25000
000003@stack.mrcs 12.0 22.0 32.0 1.0 1.0 15000 14000 5 200 2.7 0.1 5.0 20000
"""


def test_relion30_is_normalised_to_31(tmp_path):
    _stack(tmp_path / "stack.mrcs", 3, box=24)  # image size known only from the stack header
    (tmp_path / "old.star").write_text(RELION30)
    star = read_particles_star(tmp_path / "old.star")
    # Pixel size = detector pixel (µm) * 1e4 / magnification: 2.0 Å and 2.5 Å -> two optics groups.
    assert star.optics["rlnImagePixelSize"].tolist() == pytest.approx([2.0, 2.5])
    assert star.optics["rlnVoltage"].tolist() == pytest.approx([300, 200])
    assert star.optics["rlnImageSize"].tolist() == [24, 24]
    assert star.optics["rlnOpticsGroup"].tolist() == [1, 2]
    for col in ("rlnOpticsGroupName", "rlnImageDimensionality", "rlnSphericalAberration", "rlnAmplitudeContrast"):
        assert col in star.optics.columns
    assert star.particles["rlnOpticsGroup"].tolist() == [1, 1, 2]
    # Origins: pixels -> Å with each particle's own pixel size.
    np.testing.assert_allclose(star.particles["rlnOriginXAngst"], [4.0, -6.0, 2.5])
    np.testing.assert_allclose(star.particles["rlnOriginYAngst"], [-2.0, 1.0, 2.5])
    for gone in ("rlnOriginX", "rlnOriginY", "rlnVoltage", "rlnMagnification", "rlnDetectorPixelSize"):
        assert gone not in star.particles.columns
    np.testing.assert_allclose(star.particles["rlnDefocusU"], [15000] * 3)  # CTF stays per particle
    merged = particles_with_optics(star)
    np.testing.assert_allclose(merged["rlnImagePixelSize"], [2.0, 2.0, 2.5])
    np.testing.assert_allclose(merged["rlnVoltage"], [300, 300, 200])
    # Written back as RELION 3.1 and read again: same values.
    write_particles_star(tmp_path / "new.star", star)
    assert "data_optics" in (tmp_path / "new.star").read_text()
    again = read_particles_star(tmp_path / "new.star")
    np.testing.assert_allclose(again.particles["rlnOriginXAngst"], [4.0, -6.0, 2.5])
    np.testing.assert_allclose(particles_with_optics(again)["rlnImagePixelSize"], [2.0, 2.0, 2.5])


def test_relion30_with_rlnpixelsize_and_image_size_in_the_file(tmp_path):
    text = RELION30.replace("_rlnDetectorPixelSize #13\n_rlnMagnification #14", "_rlnPixelSize #13\n_rlnImageSize #14")
    text = text.replace(" 5.0 25000", " 1.7 32").replace(" 5.0 20000", " 1.7 32")
    (tmp_path / "old.star").write_text(text)  # no stack: the image size is in the file
    star = read_particles_star(tmp_path / "old.star")
    assert len(star.optics) == 2  # the voltages differ
    assert star.optics["rlnImagePixelSize"].tolist() == pytest.approx([1.7, 1.7])
    assert star.optics["rlnImageSize"].tolist() == [32, 32]
    np.testing.assert_allclose(star.particles["rlnOriginXAngst"], [3.4, -5.1, 1.7])


def test_relion30_errors(tmp_path):
    bad = RELION30.replace("000002@stack.mrcs 11.0 21.0 31.0 -3.0", "000002@stack.mrcs 11.0 21.0 31.0 abc")
    (tmp_path / "a.star").write_text(bad)
    with pytest.raises(InputError, match=r"a\.star: data_ row 1 \(0-based\), column rlnOriginX: value 'abc'"):
        read_particles_star(tmp_path / "a.star")
    no_px = RELION30.replace("_rlnDetectorPixelSize", "_rlnSomethingElse")
    (tmp_path / "b.star").write_text(no_px)
    with pytest.raises(InputError, match=r"b\.star: .*pixel size.*rlnPixelSize"):
        read_particles_star(tmp_path / "b.star")
    no_voltage = RELION30.replace("_rlnVoltage", "_rlnSomethingElse")
    (tmp_path / "c.star").write_text(no_voltage)
    with pytest.raises(InputError, match=r"c\.star: data_, rlnVoltage"):
        read_particles_star(tmp_path / "c.star")
    no_name = RELION30.replace("_rlnImageName", "_rlnSomethingElse")
    (tmp_path / "d.star").write_text(no_name)
    with pytest.raises(InputError, match=r"d\.star: data_, rlnImageName"):
        read_particles_star(tmp_path / "d.star")


def test_two_optics_groups_keep_their_pixel_sizes(tmp_path):
    star = ParticleStar(_optics(px=(1.0, 2.0)), _particles(4, groups=[1, 2, 2, 1]))
    write_particles_star(tmp_path / "p.star", star)
    back = read_particles_star(tmp_path / "p.star")
    merged = particles_with_optics(back)
    np.testing.assert_allclose(merged["rlnImagePixelSize"], [1.0, 2.0, 2.0, 1.0])
    assert merged["rlnOpticsGroupName"].tolist() == ["g0", "g1", "g1", "g0"]
    assert merged["rlnImageName"].tolist() == back.particles["rlnImageName"].tolist()
    # A reordered/subset table keeps its own index and order.
    sub = ParticleStar(back.optics, back.particles.iloc[[3, 1]])
    merged = particles_with_optics(sub)
    assert merged.index.tolist() == [3, 1]
    np.testing.assert_allclose(merged["rlnImagePixelSize"], [1.0, 2.0])


def test_missing_image_name_is_named(tmp_path):
    write_particles_star(tmp_path / "p.star", ParticleStar(_optics(), _particles().drop(columns="rlnImageName")))
    with pytest.raises(InputError, match=r"p\.star: data_particles, rlnImageName: missing column"):
        read_particles_star(tmp_path / "p.star")


def test_missing_optics_group_and_optics_column(tmp_path):
    write_particles_star(tmp_path / "p.star", ParticleStar(_optics(), _particles().drop(columns="rlnOpticsGroup")))
    with pytest.raises(InputError, match=r"p\.star: data_particles, rlnOpticsGroup"):
        read_particles_star(tmp_path / "p.star")
    write_particles_star(tmp_path / "q.star", ParticleStar(_optics().drop(columns="rlnImagePixelSize"), _particles()))
    with pytest.raises(InputError, match=r"q\.star: data_optics, rlnImagePixelSize: missing column"):
        read_particles_star(tmp_path / "q.star")
    text = _star_text(None, _particles()).replace(
        "data_particles", "data_optics\n\nloop_\n_rlnOpticsGroup #1\n1\n\ndata_other"
    )
    (tmp_path / "r.star").write_text(text)
    with pytest.raises(InputError, match="r.star"):
        read_particles_star(tmp_path / "r.star")


def test_nan_angle_names_row_and_column(tmp_path):
    parts = _particles()
    parts.loc[3, "rlnAngleTilt"] = np.nan
    (tmp_path / "p.star").write_text(_star_text(_optics(), parts))
    with pytest.raises(
        InputError,
        match=r"p\.star: data_particles row 3 \(0-based\), column rlnAngleTilt: "
        r"value .*nan.* is not a finite number",
    ):
        read_particles_star(tmp_path / "p.star")


@pytest.mark.parametrize("column", ["rlnOriginYAngst", "rlnDefocusV"])
def test_infinite_origin_or_defocus_names_row_and_column(tmp_path, column):
    parts = _particles()
    parts.loc[2, column] = np.inf
    (tmp_path / "p.star").write_text(_star_text(_optics(), parts))
    with pytest.raises(InputError, match=rf"row 2 \(0-based\), column {column}"):
        read_particles_star(tmp_path / "p.star")


def test_bad_optics_values(tmp_path):
    optics = _optics()
    optics.loc[0, "rlnImagePixelSize"] = 0.0
    (tmp_path / "p.star").write_text(_star_text(optics, _particles()))
    with pytest.raises(InputError, match=r"data_optics row 0 \(0-based\), column rlnImagePixelSize.*positive"):
        read_particles_star(tmp_path / "p.star")


def test_unknown_optics_group(tmp_path):
    write_particles_star(tmp_path / "p.star", ParticleStar(_optics(), _particles(3, groups=[1, 1, 7])))
    with pytest.raises(InputError, match=r"row 2 \(0-based\), column rlnOpticsGroup: optics group 7 is not"):
        read_particles_star(tmp_path / "p.star")


def test_bad_image_name_in_star(tmp_path):
    parts = _particles()
    parts.loc[4, "rlnImageName"] = "particles_0.mrcs"
    write_particles_star(tmp_path / "p.star", ParticleStar(_optics(), parts))
    with pytest.raises(InputError, match=r"row 4 \(0-based\), column rlnImageName"):
        read_particles_star(tmp_path / "p.star")


def test_unreadable_empty_and_missing_star(tmp_path):
    with pytest.raises(InputError, match=r"none\.star: STAR file not found"):
        read_particles_star(tmp_path / "none.star")
    (tmp_path / "empty.star").write_text("")
    with pytest.raises(InputError, match=r"empty\.star: empty or unreadable"):
        read_particles_star(tmp_path / "empty.star")
    (tmp_path / "junk.star").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(InputError, match=r"junk\.star"):
        read_particles_star(tmp_path / "junk.star")
    no_rows = _star_text(_optics(), _particles().iloc[:0])
    (tmp_path / "norows.star").write_text(no_rows)
    with pytest.raises(InputError, match=r"norows\.star: .*no particles"):
        read_particles_star(tmp_path / "norows.star")


def test_parse_image_name():
    assert parse_image_name("000012@path/particles_0.mrcs") == (11, "path/particles_0.mrcs")
    assert parse_image_name("1@/abs/s.mrcs") == (0, "/abs/s.mrcs")
    for bad in ("particles.mrcs", "0@x.mrcs", "a@x.mrcs", "3@", "@x.mrcs", "-2@x.mrcs"):
        with pytest.raises(InputError, match="rlnImageName"):
            parse_image_name(bad)


def test_resolve_stack_path_policy(tmp_path, monkeypatch):
    """Any STAR file: RELION's rule first (the working directory), its own folder second with a
    warning. An entry's STAR file (CESPED's layout): its own folder first."""
    (tmp_path / "e").mkdir()
    (tmp_path / "cwd").mkdir()
    _stack(tmp_path / "e" / "s.mrcs")
    _stack(tmp_path / "e" / "only_beside.mrcs")
    _stack(tmp_path / "cwd" / "s.mrcs")
    _stack(tmp_path / "cwd" / "only_cwd.mrcs")
    monkeypatch.chdir(tmp_path / "cwd")
    star = tmp_path / "e" / "p.star"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the working directory: RELION's own rule, nothing to warn about
        assert resolve_stack_path(star, "s.mrcs") == tmp_path / "cwd" / "s.mrcs"
        assert resolve_stack_path(star, "only_cwd.mrcs") == tmp_path / "cwd" / "only_cwd.mrcs"
    with pytest.warns(StackPathWarning, match="not in the working directory"):
        assert resolve_stack_path(star, "only_beside.mrcs") == tmp_path / "e" / "only_beside.mrcs"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per STAR file
        assert resolve_stack_path(star, "only_beside.mrcs") == tmp_path / "e" / "only_beside.mrcs"
    with pytest.raises(StackNotFound) as err:
        resolve_stack_path(star, "nope.mrcs")
    msg = str(err.value)
    assert str(tmp_path / "e" / "nope.mrcs") in msg and str(tmp_path / "cwd" / "nope.mrcs") in msg
    # An entry's STAR file names stacks relative to the entry: its own folder wins, silently.
    entry_star = tmp_path / "e" / "particles_0.star"
    (tmp_path / "e" / "info_0.json").write_text('{"symmetry": "C1"}')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_stack_path(entry_star, "s.mrcs") == tmp_path / "e" / "s.mrcs"
        assert resolve_stack_path(entry_star, "only_cwd.mrcs") == tmp_path / "cwd" / "only_cwd.mrcs"


# ----------------------------------------------------------------------------------------------
# MRC
# ----------------------------------------------------------------------------------------------


def test_read_images_through_a_memmap_in_requested_order(tmp_path):
    data = _stack(tmp_path / "s.mrcs", n=10)
    assert stack_shape(tmp_path / "s.mrcs") == (10, 16, 16)
    stack = open_stack(tmp_path / "s.mrcs")
    try:
        assert isinstance(stack.data, np.memmap) and not stack.data.flags.writeable
        idx = [7, 2, 3, 2, 9, 0]
        out = read_images(stack, idx)
        assert out.dtype == np.float32 and out.shape == (6, 16, 16)
        np.testing.assert_array_equal(out, data[idx])
        np.testing.assert_array_equal(read_images(stack, np.array([5])), data[[5]])
        assert read_images(stack, []).shape == (0, 16, 16)
        with pytest.raises(InputError, match=r"s\.mrcs: image index 10 \(0-based\) is outside the stack of 10 images"):
            read_images(stack, [1, 10])
        with pytest.raises(InputError, match="image index -1"):
            read_images(stack, [-1])
    finally:
        stack.close()


class _CountingArray:
    """Wraps an array and records every slice taken from it."""

    def __init__(self, array):
        self.array, self.slices = array, []
        self.ndim, self.shape = array.ndim, array.shape

    def __getitem__(self, key):
        self.slices.append(key)
        return self.array[key]


def test_read_images_reads_one_slice_per_contiguous_run():
    data = np.random.default_rng(0).normal(size=(12, 4, 4)).astype(np.float32)
    fake = _CountingArray(data)

    class Stack:
        pass

    stack = Stack()
    stack.data = fake
    idx = [9, 3, 5, 4, 3, 10, 0]  # runs: 0, 3-5, 9-10
    np.testing.assert_array_equal(read_images(stack, idx), data[idx])
    assert fake.slices == [slice(0, 1), slice(3, 6), slice(9, 11)]


def test_truncated_and_corrupt_mrc(tmp_path):
    _stack(tmp_path / "s.mrcs", n=10)
    raw = (tmp_path / "s.mrcs").read_bytes()
    (tmp_path / "short.mrcs").write_bytes(raw[: len(raw) - 700])
    expected, actual = len(raw), len(raw) - 700
    with pytest.raises(InputError, match=rf"short\.mrcs: truncated .*expected {expected} bytes.* {actual} bytes"):
        open_stack(tmp_path / "short.mrcs")
    with pytest.raises(InputError, match=r"short\.mrcs: truncated"):
        stack_shape(tmp_path / "short.mrcs")
    (tmp_path / "junk.mrcs").write_bytes(b"\x00" * 2000)
    with pytest.raises(InputError, match=r"junk\.mrcs: not a valid MRC file"):
        open_stack(tmp_path / "junk.mrcs")
    with pytest.raises(InputError, match=r"absent\.mrcs: MRC file not found"):
        open_stack(tmp_path / "absent.mrcs")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "particles_0.star"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            assert tmp.parent == tmp_path and tmp.suffix == ".star" and tmp != target
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["particles_0.star"]
    with atomic_write(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"  # nothing visible until the block ends
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["particles_0.star"]


def test_stack_writer_writes_a_valid_stack(tmp_path):
    images = np.random.default_rng(1).normal(size=(4, 8, 8))
    with StackWriter(tmp_path / "s.mrcs", 4, 8, 1.7) as w:
        w.write(2, images[2:])
        w.write(0, images[:2])
        assert not (tmp_path / "s.mrcs").exists()
    assert stack_shape(tmp_path / "s.mrcs") == (4, 8, 8)
    assert mrcfile.validate(str(tmp_path / "s.mrcs"), print_file=stdio.StringIO())
    with mrcfile.open(tmp_path / "s.mrcs", permissive=False) as m:
        np.testing.assert_allclose(m.data, images.astype(np.float32))
        assert m.voxel_size.x == pytest.approx(1.7) and m.is_image_stack()
        assert m.header.dmax == pytest.approx(images.max(), rel=1e-6)
        assert m.header.dmean == pytest.approx(images.mean(), abs=1e-6)
        assert m.header.rms == pytest.approx(images.std(), rel=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["s.mrcs"]


def test_stack_writer_failure_leaves_no_file(tmp_path):
    with pytest.raises(RuntimeError):
        with StackWriter(tmp_path / "t.mrcs", 4, 8, 1.7) as w:
            w.write(0, np.ones((2, 8, 8)))
            raise RuntimeError("simulator crashed")
    with pytest.raises(ValueError, match="do not fit"):
        with StackWriter(tmp_path / "t.mrcs", 4, 8, 1.7) as w:
            w.write(3, np.ones((2, 8, 8)))
    with pytest.raises(ValueError, match="never written"):
        with StackWriter(tmp_path / "t.mrcs", 4, 8, 1.7) as w:
            w.write(0, np.ones((3, 8, 8)))
    assert list(tmp_path.iterdir()) == []
    # An existing stack is left as it was.
    old = _stack(tmp_path / "t.mrcs", n=2, box=8)
    with pytest.raises(RuntimeError):
        with StackWriter(tmp_path / "t.mrcs", 4, 8, 1.7) as w:
            raise RuntimeError
    with mrcfile.open(tmp_path / "t.mrcs") as m:
        np.testing.assert_array_equal(m.data, old)
    assert [p.name for p in tmp_path.iterdir()] == ["t.mrcs"]


def test_map_round_trip(tmp_path):
    vol = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    vol[1, 2, 3] = 50.0  # [z, y, x] order is kept
    write_map(tmp_path / "m.mrc", vol, 1.23)
    back, px = read_map(tmp_path / "m.mrc")
    assert back.dtype == np.float32 and back[1, 2, 3] == 50.0
    np.testing.assert_array_equal(back, vol)
    assert px == pytest.approx(1.23)
    with mrcfile.open(tmp_path / "m.mrc") as m:
        assert (m.header.nx, m.header.ny, m.header.nz) == (8, 8, 8)
    with mrcfile.new(tmp_path / "flat.mrc") as m:
        m.set_data(np.zeros((4, 8, 8), np.float32))
    with pytest.raises(InputError, match=r"flat\.mrc: expected a cubic 3D map"):
        read_map(tmp_path / "flat.mrc")


# ----------------------------------------------------------------------------------------------
# Entries
# ----------------------------------------------------------------------------------------------


def test_entry_layout_and_properties(tmp_path):
    entry = _entry(tmp_path / "bench" / "10280", symmetry="c2")
    entry.validate()
    assert resolve_entry("10280", tmp_path / "bench") == entry
    assert entry.name == "10280" and entry.symmetry == "C2" and entry.box_size == 16
    assert entry.pixel_size == pytest.approx(PX)
    assert entry.n_particles(1) == 5 and entry.halves == (0, 1)
    assert entry.star_path(1) == entry.root / "particles_1.star"
    assert entry.stack_path(0) == entry.root / "particles_0.mrcs"
    assert entry.info_path(0) == entry.root / "info_0.json"
    assert entry.mask_path == entry.root / "10280_mask.mrc"
    assert entry.ground_truth_map_path == entry.root / "10280_source_map.mrc"
    assert entry.read_star(0) is entry.read_star(0)
    for bad in (2, -1, "0", True):
        with pytest.raises(InputError, match="half must be 0 or 1"):
            entry.star_path(bad)
    with pytest.raises(InputError, match=r"no entry 'nope'.*benchmark directory"):
        resolve_entry("nope", tmp_path / "bench")


def test_entry_stack_box_disagreeing_with_optics(tmp_path):
    entry = _entry(tmp_path / "e")
    _stack(entry.stack_path(1), 5, box=20)
    with pytest.raises(InputError) as err:
        Entry(entry.root).validate()
    msg = str(err.value)
    assert "particles_1.mrcs" in msg and "particles_1.star" in msg
    assert "20 x 20" in msg and "rlnImageSize 16" in msg


def test_entry_index_beyond_stack(tmp_path):
    entry = _entry(tmp_path / "e")
    _stack(entry.stack_path(0), 3)
    with pytest.raises(InputError, match=r"particles_0\.star: .*image 5 \(1-based\).*holds 3 images"):
        Entry(entry.root).validate()


def test_entry_truncated_stack(tmp_path):
    entry = _entry(tmp_path / "e")
    raw = entry.stack_path(1).read_bytes()
    entry.stack_path(1).write_bytes(raw[:-100])
    with pytest.raises(InputError, match=r"particles_1\.mrcs: truncated"):
        Entry(entry.root).validate()


def test_entry_symmetry_errors(tmp_path):
    entry = _entry(tmp_path / "e", symmetry="X5")
    with pytest.raises(InputError, match=r"info_0\.json: symmetry: .*X5"):
        _ = Entry(entry.root).symmetry
    (entry.root / "info_0.json").write_text(json.dumps({"symmetry": "C3"}))
    (entry.root / "info_1.json").write_text(json.dumps({"symmetry": "C2"}))
    with pytest.raises(InputError, match="disagree on the symmetry"):
        _ = Entry(entry.root).symmetry
    (entry.root / "info_1.json").write_text("{not json")
    with pytest.raises(InputError, match=r"info_1\.json: not valid JSON"):
        _ = Entry(entry.root).symmetry


def test_entry_halves_disagree_on_pixel_size(tmp_path):
    entry = _entry(tmp_path / "e")
    star = entry.read_star(1)
    star.optics["rlnImagePixelSize"] = 1.5
    write_particles_star(entry.star_path(1), star)
    with pytest.raises(InputError, match=r"halves disagree on rlnImagePixelSize"):
        Entry(entry.root).validate()


def test_entry_mask_of_another_box(tmp_path):
    entry = _entry(tmp_path / "e")
    write_map(entry.mask_path, np.ones((16, 16, 16), np.float32), PX)
    Entry(entry.root).validate()
    write_map(entry.mask_path, np.ones((12, 12, 12), np.float32), PX)
    with pytest.raises(InputError, match=r"e_mask\.mrc: mask has shape \(12, 12, 12\).*box is 16"):
        Entry(entry.root).validate()


def test_entry_missing_file(tmp_path):
    entry = _entry(tmp_path / "e")
    entry.info_path(1).unlink()
    with pytest.raises(InputError, match=r"info_1\.json: missing file"):
        Entry(entry.root).validate()
    with pytest.raises(InputError, match="entry folder not found"):
        Entry(tmp_path / "absent")
