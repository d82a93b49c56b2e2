"""The example plugin package (examples/cryopose-svd-regressor) installed into a folder of its own,
which only child processes see (PYTHONPATH): the test process's registry stays the built-in one."""

import shutil
import subprocess
import sys
from pathlib import Path

from snakemake_runs import ROOT

EXAMPLE = ROOT / "examples" / "cryopose-svd-regressor"


def install_example_plugin(site: Path, scratch: Path, broken: bool = True) -> Path:
    """pip-install the example (no dependencies: cryopose and torch are this environment's) into
    ``site``, plus, with ``broken``, a distribution whose entry point names a missing module."""
    # Built from a copy: pip's build leaves build/ and *.egg-info beside the sources it is given.
    source = shutil.copytree(EXAMPLE, scratch / EXAMPLE.name)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--target", str(site)]
        + [str(source)],
        check=True,
        capture_output=True,
    )
    assert not (EXAMPLE / "build").exists()  # the repository's copy is left as it is
    if broken:
        dist = site / "broken_plugin-0.1.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
        (dist / "entry_points.txt").write_text("[cryopose.methods]\nbroken = no_such_module_here:METHOD\n")
    return site
