"""Methods from other packages (issue 20, item 1): an installed package's entry point in the group
``cryopose.methods`` joins the registry, the command line and the workflow without a change to
cryopose; a plugin that cannot load is named with its error and the other methods still run.

The example package ``examples/cryopose-svd-regressor`` is installed with pip into a folder of
its own that only the child processes see (tests/example_plugin.py). Its rows in a workflow's
leaderboard: tests/workflow/test_outside_methods.py."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from example_plugin import install_example_plugin


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The example plugin installed, plus a broken plugin: a distribution whose entry point names a
    module that does not exist."""
    return install_example_plugin(tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("source"))


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
