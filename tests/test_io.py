import json

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryopose.errors import InputError
from cryopose.io import (Entry, ParticleStar, StackWriter, atomic_write, open_stack, parse_image_name,
                         particles_with_optics, read_images, read_map, read_particles_star, resolve_stack_path,
                         stack_shape, write_map, write_particles_star)


def _optics(px=(1.51338,), size=(16,)):
    n = len(px)
    return pd.DataFrame({"rlnOpticsGroup": np.arange(1, n + 1), "rlnOpticsGroupName": [f"g{i}" for i in range(n)],
                         "rlnImagePixelSize": list(px), "rlnImageSize": list(size) * (n // len(size)),
                         "rlnImageDimensionality": [2] * n, "rlnVoltage": [300.0] * n,
                         "rlnSphericalAberration": [2.7] * n, "rlnAmplitudeContrast": [0.1] * n})


def _particles(n=5, stack="particles_0.mrcs", groups=None):
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@{stack}" for i in range(n)],
        "rlnOpticsGroup": groups if groups is not None else [1] * n,
        "rlnAngleRot": rng.uniform(-180, 180, n), "rlnAngleTilt": rng.uniform(0, 180, n),
        "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnOriginXAngst": rng.normal(0, 3, n), "rlnOriginYAngst": rng.normal(0, 3, n),
        "rlnDefocusU": rng.uniform(10000, 20000, n), "rlnDefocusV": rng.uniform(10000, 20000, n),
        "rlnDefocusAngle": rng.uniform(0, 180, n), "rlnMaxValueProbDistribution": rng.uniform(0, 1, n),
    })


def _stack(path, n=5, box=16, px=1.51338):
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
        write_particles_star(root / f"particles_{h}.star",
                             ParticleStar(_optics(size=(box,)), _particles(n, f"particles_{h}.mrcs")))
        (root / f"info_{h}.json").write_text(json.dumps({"symmetry": symmetry}))
    return Entry(root)


def test_relion31_round_trip(tmp_path):
    star = ParticleStar(_optics(), _particles())
    write_particles_star(tmp_path / "p.star", star)
    back = read_particles_star(tmp_path / "p.star")
    cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst"]
    np.testing.assert_allclose(back.particles[cols].to_numpy(), star.particles[cols].to_numpy(), atol=1e-6)
    assert back.optics["rlnImagePixelSize"].iloc[0] == pytest.approx(1.51338)
    text = (tmp_path / "p.star").read_text()
    assert "data_optics" in text and "data_particles" in text


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
    _stack(tmp_path / "stack.mrcs", 3, 16)
    (tmp_path / "old.star").write_text(RELION30)
    star = read_particles_star(tmp_path / "old.star")
    # Pixel size = detector pixel (µm) * 1e4 / magnification: 2.0 Å and 2.5 Å; two optics groups.
    assert sorted(star.optics["rlnImagePixelSize"]) == pytest.approx([2.0, 2.5])
    assert len(star.optics) == 2 and (star.optics["rlnImageSize"] == 16).all()
    merged = particles_with_optics(star)
    np.testing.assert_allclose(merged["rlnImagePixelSize"], [2.0, 2.0, 2.5])
    np.testing.assert_allclose(merged["rlnVoltage"], [300, 300, 200])
    # Origins: pixels -> Å with each particle's own pixel size.
    np.testing.assert_allclose(star.particles["rlnOriginXAngst"], [4.0, -6.0, 2.5])
    np.testing.assert_allclose(star.particles["rlnOriginYAngst"], [-2.0, 1.0, 2.5])
    assert "rlnOriginX" not in star.particles.columns and "rlnVoltage" not in star.particles.columns
    write_particles_star(tmp_path / "new.star", star)
    again = read_particles_star(tmp_path / "new.star")
    np.testing.assert_allclose(again.particles["rlnOriginXAngst"], [4.0, -6.0, 2.5])


def test_relion30_with_rlnpixelsize(tmp_path):
    text = RELION30.replace("_rlnDetectorPixelSize #13\n_rlnMagnification #14", "_rlnPixelSize #13")
    text = text.replace(" 5.0 25000", " 1.7").replace(" 5.0 20000", " 1.7")
    _stack(tmp_path / "stack.mrcs", 3, 16)
    (tmp_path / "old.star").write_text(text)
    star = read_particles_star(tmp_path / "old.star")
    assert len(star.optics) == 2  # voltages differ
    np.testing.assert_allclose(star.particles["rlnOriginXAngst"], [3.4, -5.1, 1.7])


def test_two_optics_groups_keep_their_pixel_sizes(tmp_path):
    star = ParticleStar(_optics(px=(1.0, 2.0), size=(16,)), _particles(4, groups=[1, 2, 2, 1]))
    write_particles_star(tmp_path / "p.star", star)
    merged = particles_with_optics(read_particles_star(tmp_path / "p.star"))
    np.testing.assert_allclose(merged["rlnImagePixelSize"], [1.0, 2.0, 2.0, 1.0])


@pytest.mark.parametrize("drop, where", [("rlnImageName", "rlnImageName"), ("rlnOpticsGroup", "rlnOpticsGroup")])
def test_missing_particle_columns(tmp_path, drop, where):
    write_particles_star(tmp_path / "p.star", ParticleStar(_optics(), _particles().drop(columns=drop)))
    with pytest.raises(InputError, match=where) as err:
        read_particles_star(tmp_path / "p.star")
    assert "p.star" in str(err.value)


def test_missing_optics_column(tmp_path):
    write_particles_star(tmp_path / "p.star", ParticleStar(_optics().drop(columns="rlnImagePixelSize"), _particles()))
    with pytest.raises(InputError, match="data_optics, rlnImagePixelSize"):
        read_particles_star(tmp_path / "p.star")


def test_non_finite_value_names_row_and_column(tmp_path):
    parts = _particles()
    parts.loc[3, "rlnAngleTilt"] = np.nan
    write_particles_star(tmp_path / "p.star", ParticleStar(_optics(), parts))
    with pytest.raises(InputError, match=r"p\.star: data_particles row 3 \(0-based\), column rlnAngleTilt"):
        read_particles_star(tmp_path / "p.star")


def test_unknown_optics_group(tmp_path):
    write_particles_star(tmp_path / "p.star", ParticleStar(_optics(), _particles(3, groups=[1, 1, 7])))
    with pytest.raises(InputError, match=r"row 2 \(0-based\), rlnOpticsGroup: optics group 7"):
        read_particles_star(tmp_path / "p.star")


def test_unreadable_and_missing_star(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_particles_star(tmp_path / "none.star")
    (tmp_path / "empty.star").write_text("")
    with pytest.raises(InputError, match="empty.star"):
        read_particles_star(tmp_path / "empty.star")


def test_parse_image_name():
    assert parse_image_name("000012@sub/particles_0.mrcs") == (11, "sub/particles_0.mrcs")
    for bad in ("particles.mrcs", "0@x.mrcs", "a@x.mrcs", "3@"):
        with pytest.raises(InputError, match="rlnImageName"):
            parse_image_name(bad)


def test_resolve_stack_path_prefers_the_star_folder(tmp_path, monkeypatch):
    (tmp_path / "e").mkdir()
    _stack(tmp_path / "e" / "s.mrcs")
    monkeypatch.chdir(tmp_path)
    assert resolve_stack_path(tmp_path / "e" / "p.star", "s.mrcs") == tmp_path / "e" / "s.mrcs"
    with pytest.raises(InputError, match="nope.mrcs"):
        resolve_stack_path(tmp_path / "e" / "p.star", "nope.mrcs")


def test_read_images_is_memory_mapped_and_ordered(tmp_path):
    data = _stack(tmp_path / "s.mrcs", n=10)
    stack = open_stack(tmp_path / "s.mrcs")
    assert isinstance(stack.data, np.memmap)
    idx = [7, 2, 3, 2, 9, 0]
    np.testing.assert_array_equal(read_images(stack, idx), data[idx])
    assert read_images(stack, []).shape == (0, 16, 16)
    with pytest.raises(InputError, match=r"image index 10 .* 10 images"):
        read_images(stack, [1, 10])
    stack.close()


def test_truncated_and_corrupt_mrc(tmp_path):
    _stack(tmp_path / "s.mrcs", n=10)
    raw = (tmp_path / "s.mrcs").read_bytes()
    (tmp_path / "short.mrcs").write_bytes(raw[: len(raw) - 700])
    with pytest.raises(InputError, match="short.mrcs"):
        open_stack(tmp_path / "short.mrcs")
    (tmp_path / "junk.mrcs").write_bytes(b"\x00" * 100)
    with pytest.raises(InputError, match="junk.mrcs"):
        open_stack(tmp_path / "junk.mrcs")


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "x.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_write(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]
    with atomic_write(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_stack_writer_is_atomic_and_valid(tmp_path):
    with StackWriter(tmp_path / "s.mrcs", 4, 8, 1.7) as w:
        w.write(0, np.ones((2, 8, 8)))
        w.write(2, 2 * np.ones((2, 8, 8)))
    assert stack_shape(tmp_path / "s.mrcs") == (4, 8, 8)
    with mrcfile.open(tmp_path / "s.mrcs", permissive=False) as m:
        assert m.voxel_size.x == pytest.approx(1.7) and m.header.dmax == 2 and m.header.dmean == pytest.approx(1.5)
    with pytest.raises(ValueError):
        with StackWriter(tmp_path / "t.mrcs", 4, 8, 1.7) as w:
            w.write(3, np.ones((2, 8, 8)))  # does not fit
    assert not (tmp_path / "t.mrcs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.mrcs"]


def test_map_round_trip(tmp_path):
    vol = np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32)
    write_map(tmp_path / "m.mrc", vol, 1.23)
    back, px = read_map(tmp_path / "m.mrc")
    np.testing.assert_array_equal(back, vol)
    assert px == pytest.approx(1.23)


def test_entry_properties_and_validation(tmp_path):
    entry = _entry(tmp_path / "10280")
    entry.validate()
    assert entry.name == "10280" and entry.symmetry == "C2" and entry.box_size == 16
    assert entry.pixel_size == pytest.approx(1.51338)  # never assumed 1.5
    assert entry.n_particles(1) == 5
    assert entry.mask_path.name == "10280_mask.mrc"
    with pytest.raises(InputError, match="half must be 0 or 1"):
        entry.star_path(2)


def test_entry_box_disagreeing_with_optics(tmp_path):
    entry = _entry(tmp_path / "e")
    _stack(entry.stack_path(1), 5, box=20)
    with pytest.raises(InputError, match=r"particles_1.mrcs: box size: stack images are 20×20 .* rlnImageSize 16"):
        Entry(entry.root).validate()


def test_entry_index_beyond_stack(tmp_path):
    entry = _entry(tmp_path / "e")
    _stack(entry.stack_path(0), 3)
    with pytest.raises(InputError, match=r"particles_0.star.*image 5 \(1-based\) but the stack holds 3"):
        Entry(entry.root).validate()


def test_entry_unknown_symmetry_and_disagreeing_halves(tmp_path):
    entry = _entry(tmp_path / "e", symmetry="X5")
    with pytest.raises(InputError, match=r"info_0.json: symmetry: .*X5"):
        _ = Entry(entry.root).symmetry
    (entry.root / "info_0.json").write_text(json.dumps({"symmetry": "C3"}))
    (entry.root / "info_1.json").write_text(json.dumps({"symmetry": "C2"}))
    with pytest.raises(InputError, match="disagree"):
        _ = Entry(entry.root).symmetry


def test_entry_mask_of_another_box(tmp_path):
    entry = _entry(tmp_path / "e")
    write_map(entry.mask_path, np.ones((12, 12, 12), np.float32), 1.51338)
    with pytest.raises(InputError, match="e_mask.mrc"):
        Entry(entry.root).validate()


def test_entry_missing_file(tmp_path):
    entry = _entry(tmp_path / "e")
    entry.info_path(1).unlink()
    with pytest.raises(InputError, match="info_1.json"):
        Entry(entry.root).validate()
