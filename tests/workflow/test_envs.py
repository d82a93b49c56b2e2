"""The conda environment of the workflow's rules (`--sdm conda`) against pyproject.toml."""

import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]


def _requirements(specs):
    return {(r.name.lower().replace("_", "-"), str(r.specifier)) for r in map(Requirement, specs)}


def test_conda_env_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "envs" / "cryopose.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    listed = [p for p in pip if not p.startswith("-e")]
    assert _requirements(listed) == _requirements(project["dependencies"])
    assert "-e ../" in pip  # the package itself, from the repository root (envs/..)
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    version = tuple(int(x) for x in python.split("=")[1].split("."))
    minimum = tuple(int(x) for x in project["requires-python"].lstrip(">=").split("."))
    assert version >= minimum


def test_every_rule_uses_an_existing_env():
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        for line in text.splitlines():
            if line.strip().startswith('"../../envs/'):
                assert (smk.parent / line.strip().strip('",')).resolve().is_file(), (smk.name, line)
