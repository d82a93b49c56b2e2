"""Methods from other packages (issue 20, item 1): an installed package's entry point in the group
``cryopose.methods`` joins the registry, the command line and the workflow without a change to
cryopose; a plugin that cannot load is named with its error and the other methods still run.

The example package ``examples/cryopose-svd-regressor`` is installed with pip into a folder of
its own that only the child processes see (PYTHONPATH), so this test process's registry is the
built-in one."""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from snakemake_runs import ROOT, _workdir, snakemake

EXAMPLE = ROOT / "examples" / "cryopose-svd-regressor"


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The example plugin installed (no dependencies: cryopose and torch are this environment's),
    plus a broken plugin: a distribution whose entry point names a module that does not exist."""
    site = tmp_path_factory.mktemp("site")
    # Built from a copy: pip's build leaves build/ and *.egg-info beside the sources it is given.
    source = shutil.copytree(EXAMPLE, tmp_path_factory.mktemp("source") / EXAMPLE.name)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(site)]
        + [str(source)],
        check=True,
        capture_output=True,
    )
    assert not (EXAMPLE / "build").exists()  # the repository's copy is left as it is
    broken = site / "broken_plugin-0.1.dist-info"
    broken.mkdir()
    (broken / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (broken / "entry_points.txt").write_text("[cryopose.methods]\nbroken = no_such_module_here:METHOD\n")
    return site


def _cryopose(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(site))
    return subprocess.run([sys.executable, "-m", "cryopose", *args], env=env, capture_output=True, text=True)


def test_an_installed_plugin_is_a_method_and_a_broken_one_is_named(site):
    proc = _cryopose(site, "methods")
    assert proc.returncode == 0, proc.stderr
    assert "### `svd_regressor`" in proc.stdout and "From the package cryopose-svd-regressor 0.1.0" in proc.stdout
    assert "### `image2sphere`" in proc.stdout  # the built-in ones are all still there
    assert "plugin 'broken'" in proc.stderr and "ModuleNotFoundError" in proc.stderr and "broken-plugin" in proc.stderr
    proc = _cryopose(site, "train", "--method", "broken", "--entry", "x", "--half", "0", "--out", "m")
    assert proc.returncode == 2 and "plugin 'broken'" in proc.stderr and "no_such_module_here" in proc.stderr


def test_the_plugins_rotations_are_rotations(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    from cryopose_svd_regressor import svd_rotation

    rot = svd_rotation(torch.randn(64, 3, 3, dtype=torch.float64))
    eye = torch.eye(3, dtype=torch.float64).expand(64, 3, 3)
    torch.testing.assert_close(rot @ rot.transpose(-1, -2), eye)
    torch.testing.assert_close(torch.det(rot), torch.ones(64, dtype=torch.float64))


def test_the_workflow_trains_and_ranks_a_plugin(site, tmp_path, monkeypatch):
    work = _workdir(tmp_path / "work")
    tiny = yaml.safe_load((ROOT / "config" / "tiny.yaml").read_text())
    config = {
        "base": None,
        "entries": [e for e in tiny["entries"] if e["name"] == "tiny_c1"],
        "methods": {"random": {"seed": 0}, "svd_regressor": {"epochs": 2}},
    }
    (work / "mine.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    monkeypatch.setenv("PYTHONPATH", str(site))
    snakemake(work, "results/leaderboard.csv", "--cores", "2", "--configfile", "mine.yaml")
    board = pd.read_csv(work / "results" / "leaderboard.csv").set_index("method")
    assert set(board.index) == {"random", "svd_regressor"}
    assert math.isfinite(board.loc["svd_regressor", "MAnE"]) and 0 <= board.loc["svd_regressor", "MAnE"] <= 180
    record = (work / "results" / "models" / "svd_regressor" / "tiny_c1" / "half0" / "model.json").read_text()
    assert '"final_loss"' in record
