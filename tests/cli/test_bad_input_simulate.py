"""``cryopose simulate --spec FILE`` on bad specs: every case exits non-zero with one error line that
names the spec file (or the source map) and the key, says what was expected, and writes no entry."""

from __future__ import annotations

import json
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryopose.cli import main

GOOD = dict(name="spec_c2", symmetry="C2", box_size=24, pixel_size=4.0, n_particles=10, snr=1.0, seed=3)


def _run(tmp_path: Path, spec_text: str, capsys) -> tuple[int, str, Path]:
    # A file name with a space: the message must carry it whole.
    spec = tmp_path / "my spec.json"
    spec.write_text(spec_text)
    out = tmp_path / "bench"
    code = main(["simulate", "--spec", str(spec), "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    return code, err, spec


def _assert_named(code: int, err: str, path: Path, *words: str) -> None:
    assert code != 0, err
    lines = [line for line in err.splitlines() if "error" in line]
    assert len(lines) == 1, err  # one line, not a traceback
    assert str(path) in lines[0], err
    for word in words:
        assert word in lines[0], (word, err)
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "change, words",
    [
        (dict(box_size="big"), ["box_size", "'big'", "integer"]),
        (dict(snr="0.5"), ["snr", "'0.5'", "number"]),
        (dict(seed=True), ["seed", "integer"]),
        (dict(n_particles=2.5), ["n_particles", "2.5", "integer"]),
        (dict(molecule_seed="x"), ["molecule_seed", "'x'"]),
        (dict(defocus_range=[1.0]), ["defocus_range", "[1.0]", "[low, high]"]),
        (dict(defocus_range=[0.5, 1.0, 2.0]), ["defocus_range", "[low, high]"]),
        (dict(defocus_range=[2.0, 1.0]), ["defocus_range", "low <= high"]),
        (dict(defocus_range="1-2"), ["defocus_range", "'1-2'"]),
        (dict(voltage=-300.0), ["voltage", "-300.0", "> 0"]),
        (dict(spherical_aberration=-1.0), ["spherical_aberration", "-1.0"]),
        (dict(astigmatism_max=-0.1), ["astigmatism_max", "-0.1"]),
        (dict(bfactor=-5.0), ["bfactor", "-5.0"]),
        (dict(shift_sigma=-1.0), ["shift_sigma", "-1.0"]),
        (dict(preferred_sigma=0.0), ["preferred_sigma", "0.0"]),
        (dict(contrast_sigma=-0.2), ["contrast_sigma", "-0.2"]),
        (dict(box_size=33), ["box_size", "33", "even"]),
        (dict(box_size=8), ["box_size", "8", ">= 16"]),
        (dict(amplitude_contrast=1.0), ["amplitude_contrast", "1.0", "[0, 1)"]),
        (dict(n_particles=0), ["n_particles", "0"]),
        (dict(snr=0.0), ["snr", "0.0", "> 0"]),
        (dict(symmetry="X9"), ["symmetry", "X9"]),
        (dict(symmetry="C0"), ["symmetry", "C0"]),
        (dict(symmetry="I5"), ["symmetry", "I5"]),
        (dict(symmetry=4), ["symmetry", "string"]),
        (dict(name=""), ["name", "''"]),
        (dict(name="a/b"), ["name", "a/b"]),
        (dict(snrr=0.1), ["snrr", "unknown"]),
    ],
)
def test_a_bad_value_names_the_file_and_the_key(tmp_path, capsys, change, words):
    code, err, spec = _run(tmp_path, json.dumps({**GOOD, **change}), capsys)
    _assert_named(code, err, spec, *words)
    assert not (tmp_path / "bench").exists() or not any((tmp_path / "bench").iterdir())


def test_invalid_json_names_the_file_and_the_position(tmp_path, capsys):
    code, err, spec = _run(tmp_path, '{"name": "x", "box_size": 32,\n', capsys)
    _assert_named(code, err, spec, "not valid JSON", "line")


def test_a_missing_name_is_named(tmp_path, capsys):
    code, err, spec = _run(tmp_path, json.dumps({k: v for k, v in GOOD.items() if k != "name"}), capsys)
    _assert_named(code, err, spec, "name", "missing")


@pytest.mark.parametrize(
    "text, words",
    [
        ("[1, 2]", ["[0]", "expected a JSON object"]),
        ('"spec"', ["expected a JSON object"]),
    ],
)
def test_a_spec_that_is_not_an_object_is_named(tmp_path, capsys, text, words):
    code, err, spec = _run(tmp_path, text, capsys)
    _assert_named(code, err, spec, *words)


def test_the_bad_spec_of_a_list_is_named_by_its_index(tmp_path, capsys):
    specs = [GOOD, {**GOOD, "name": "second", "voltage": -1.0}]
    code, err, spec = _run(tmp_path, json.dumps(specs), capsys)
    _assert_named(code, err, spec, "[1]", "voltage")
    # Every spec is judged before the first entry is written.
    assert not (tmp_path / "bench" / "spec_c2").exists()


def test_a_source_map_with_nan_is_named(tmp_path, capsys):
    volume = np.zeros((24, 24, 24), np.float32)
    volume[8:16, 8:16, 8:16] = 1.0
    volume[12, 12, 12] = np.nan
    source = tmp_path / "nan map.mrc"
    with mrcfile.new(source) as mrc:
        mrc.set_data(volume)
        mrc.voxel_size = 4.0
    code, err, _ = _run(tmp_path, json.dumps({**GOOD, "source": str(source)}), capsys)
    _assert_named(code, err, source, "NaN")
    assert not (tmp_path / "bench" / "spec_c2").exists()


def test_a_missing_source_file_is_named(tmp_path, capsys):
    source = tmp_path / "no such map.mrc"
    code, err, _ = _run(tmp_path, json.dumps({**GOOD, "source": str(source)}), capsys)
    _assert_named(code, err, source, "not found")
