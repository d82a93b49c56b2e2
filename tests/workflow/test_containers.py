"""The Apptainer definitions (containers/*.def) and the workflow's container wiring.

Apptainer cannot be installed on the CI machines, so the images are never built here. What is
proved: each definition parses (spython) and passes the checks spython does not make (known
sections, its %files exist, RELION and cryopose installed and tested, the pinned torch inside
pyproject's range); and `--sdm apptainer` runs every job through `apptainer exec <image>` (a
stand-in, tests/bin/apptainer, runs the command on the host). What only an HPC run proves: that
the images build and run."""

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

from snakemake_runs import ROOT, _workdir, snakemake

DEFS = sorted((ROOT / "containers").glob("*.def"))
SECTIONS = {"labels", "help", "post", "environment", "test", "runscript", "files", "setup", "startscript", "arguments"}


def sections(path: Path) -> tuple[dict, dict[str, list[str]]]:
    """Header keys and section bodies (non-comment lines) of a definition file."""
    header, body, current = {}, {}, None
    for line in path.read_text().splitlines():
        if line.startswith("%"):
            current = line[1:].split()[0]
            body[current] = []
        elif current is None:
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition(":")
                header[key.strip()] = value.strip()
        elif line.strip() and not line.strip().startswith("#"):
            body[current].append(line.strip())
    return header, body


@pytest.mark.parametrize("path", DEFS, ids=lambda p: p.name)
def test_definition_parses_and_is_complete(path):
    from spython.main.parse.parsers import SingularityParser

    recipe = SingularityParser(str(path)).recipe
    recipe = next(iter(recipe.values())) if isinstance(recipe, dict) else recipe
    assert recipe.fromHeader and recipe.install, "no base image or no %post"
    header, body = sections(path)
    assert header.get("Bootstrap") == "docker" and header.get("From"), header
    assert set(body) <= SECTIONS, set(body) - SECTIONS
    assert body.get("test") and body.get("runscript") and body.get("help"), "needs %test, %runscript and %help"
    for line in body.get("files", []):
        source = line.split()[0]
        assert (ROOT / source).exists(), f"%files source {source} is not in the repository"
    post = " ".join(body["post"])
    assert re.search(r"apt-get install [^;]*\brelion\b", post) and "openmpi-bin" in post
    assert "apt-get update" in post and "rm -rf /var/lib/apt/lists" in post
    assert any("relion_reconstruct" in t for t in body["test"])


def test_cryopose_image_installs_this_package_and_a_torch_pyproject_allows():
    header, body = sections(ROOT / "containers" / "cryopose.def")
    post = " ".join(body["post"])
    assert 'pip install --no-cache-dir "/opt/cryopose[workflow]"' in post
    files = {line.split()[1] for line in body["files"]}
    assert {"/opt/cryopose/pyproject.toml", "/opt/cryopose/src"} <= files
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_spec = next(SpecifierSet(d[len("torch") :]) for d in project["dependencies"] if re.match(r"torch[<>=]", d))
    pinned = re.search(r'"torch==([0-9.]+)"', post).group(1)
    assert pinned in torch_spec, (pinned, torch_spec)
    assert any(t.startswith("cryopose --version") for t in body["test"])
    # Debian 12's python3 is 3.11: it must satisfy requires-python.
    assert header["From"] == "debian:bookworm-slim" and project["requires-python"] == ">=3.11"


def test_sdm_apptainer_runs_every_job_in_the_image(tmp_path):
    work = _workdir(tmp_path)
    (work / "containers").mkdir()
    (work / "containers" / "cryopose.sif").write_bytes(b"")  # the stand-in only checks it exists
    log = tmp_path / "apptainer.log"
    env_path = f"{ROOT / 'tests' / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "results/ground_truth/tiny_c1/GT_half0.mrc",
            "-c1",
            "--sdm",
            "apptainer",
            "--configfile",
            "config/tiny.yaml",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        env=dict(os.environ, PATH=env_path, APPTAINER_STANDIN_LOG=str(log)),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    calls = log.read_text().splitlines()
    assert len(calls) == 2 and all(c.startswith("containers/cryopose.sif :: ") for c in calls)
    assert "cryopose simulate" in calls[0] and "cryopose ground-truth resources/benchmark/tiny_c1" in calls[1]
    assert (work / "results" / "ground_truth" / "tiny_c1" / "GT_half0.mrc").is_file()
    # Without --sdm apptainer the same job runs natively: the stand-in is not called.
    shutil.rmtree(work / "results")
    log.unlink()
    snakemake(work, "results/ground_truth/tiny_c1/GT_half0.mrc", "-c1", "--configfile", "config/tiny.yaml")
    assert not log.exists()
