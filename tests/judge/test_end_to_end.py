"""The tiny suite through every step that exists so far: simulate → validate → preprocess →
dataset → reconstruct → evaluate (both backends where RELION is present)."""

import json
import shutil

import pytest
import torch
from torch.utils.data import DataLoader

from cryopose import cli, io
from cryopose.data import ParticlesDataset
from cryopose.entry import Entry
from cryopose.metrics import pearson_correlation
from cryopose.reconstruct import reconstruct
from cryopose.simulate import SUITES

pytestmark = pytest.mark.slow


def test_tiny_suite_end_to_end(tmp_path, capsys):
    bench = tmp_path / "benchmark"
    assert cli.main(["simulate", "--suite", "tiny", "--out", str(bench), "--quiet"]) == 0
    backends = ["torch"] + (["relion"] if shutil.which("relion_reconstruct") else [])
    for spec in SUITES["tiny"]:
        capsys.readouterr()
        assert cli.main(["info", str(bench / spec.name)]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["symmetry"] == spec.symmetry and info["particles"] == {"0": spec.n_particles, "1": spec.n_particles}
        assert (
            cli.main(
                [
                    "preprocess",
                    spec.name,
                    "--benchmark-dir",
                    str(bench),
                    "--out",
                    str(tmp_path / "pre"),
                    "--image-size",
                    "24",
                    "--quiet",
                ]
            )
            == 0
        )
        ds = ParticlesDataset(tmp_path / "pre" / spec.name, 0, normalise=False)
        batches = list(DataLoader(ds, batch_size=64, num_workers=2))
        assert sum(len(b[0]) for b in batches) == spec.n_particles
        assert all(torch.isfinite(b[1]).all() for b in batches)
        entry = Entry(bench / spec.name)
        source = io.read_map(entry.ground_truth_map_path)[0]
        for backend in backends:
            vol, px = reconstruct(entry.star_path(0), symmetry=spec.symmetry, backend=backend, progress=False)
            assert px == pytest.approx(spec.pixel_size, rel=1e-4)
            # 300 particles at SNR 0.5 in a 32 px box: a recognisable map, not a fine one.
            assert pearson_correlation(vol, source) > 0.7, (spec.name, backend)  # measured 0.78-0.94
        # Evaluate ground-truth predictions (the entry's own STAR files) with each backend.
        for backend in backends:
            out = tmp_path / "eval" / spec.name / backend
            assert (
                cli.main(
                    [
                        "evaluate",
                        str(entry.root),
                        "--half0",
                        str(entry.star_path(0)),
                        "--half1",
                        str(entry.star_path(1)),
                        "--backend",
                        backend,
                        "--out",
                        str(out),
                        "--jobs",
                        "2",
                        "--quiet",
                    ]
                )
                == 0
            )
            metrics = json.loads((out / "metrics.json").read_text())
            # V is GT here, so PCC(GT,V) = 1 and ΔPCC = PCC(GT0,GT1) − 1 < 0: the noise of 300-particle
            # half-maps (measured −0.36 for tiny_c1).
            assert metrics["MAnE"] < 1e-3 and metrics["PCC(GT,V)"] > 0.999999, (spec.name, backend, metrics)
            assert metrics["delta_PCC"] == pytest.approx(metrics["PCC(GT0,GT1)"] - 1.0, abs=1e-6)
            assert {"fsc.png", "angular_errors.png", "orientations.png", "particles.csv"} <= {
                p.name for p in out.iterdir()
            }
