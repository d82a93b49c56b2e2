"""The GitHub workflow (.github/workflows/ci.yml) runs nothing the test suite does not: its lint
commands are scripts/run-tests' own, its tests are the suite's fast ones, and each of its dry runs
is also a test's. Every shipped config and profile gets a dry run there. A command added to the
workflow that the suite does not run fails here, with the command named."""

import importlib
import inspect
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CI = ROOT / ".github" / "workflows" / "ci.yml"
RUN_TESTS = ROOT / "scripts" / "run-tests"
JOBS = {"lint", "tests", "dry-runs"}

# Each dry run of the workflow, as (config file, profile, other arguments), and the test that makes
# the same one: (module, test, parameter id or None). A dry run CI makes must be listed here, and a
# test listed here must exist with that parameter, dry-run (-n) and pass the same other arguments.
NO_ACCOUNT = ("--slurm-no-account",)
DRY_RUN_TESTS = {
    ("config/config.yaml", None, ()): ("test_workflow", "test_dry_run_schedules_every_job", "config.yaml"),
    ("config/tiny.yaml", None, ()): ("test_workflow", "test_dry_run_schedules_every_job", "tiny.yaml"),
    ("config/synthetic_long.yaml", None, ()): (
        "test_workflow",
        "test_dry_run_schedules_every_job",
        "synthetic_long.yaml",
    ),
    # On a fresh clone (no entry on disk): the one that schedules the downloads, as CI's does.
    ("config/cesped.yaml", None, ()): ("test_workflow", "test_a_real_entry_must_be_on_disk_or_downloadable", None),
    ("config/tiny.yaml", "profiles/default", ()): ("test_slurm", "test_every_profile_dry_runs", "default"),
    ("config/tiny.yaml", "profiles/slurm", NO_ACCOUNT): ("test_slurm", "test_every_profile_dry_runs", "slurm"),
    ("config/tiny.yaml", "slurm", NO_ACCOUNT): (
        "test_slurm",
        "test_profile_slurm_resolves_from_the_repository_root",
        None,
    ),
}

# Steps that set up the machine rather than test anything, exactly as the workflow writes them.
PLUMBING = [["echo", "$PWD/.venv/bin", ">>", "$GITHUB_PATH"]]


def _workflow() -> dict:
    return yaml.safe_load(CI.read_text())


def _lines(script: str) -> list[list[str]]:
    """The commands of a shell script (a step's `run` or scripts/run-tests), one per line, joined
    across backslash continuations, comments dropped, split into words the way the shell does."""
    text = re.sub(r"\\\n", " ", script)
    return [words for line in text.splitlines() if (words := shlex.split(line, comments=True))]


def _run_tests_lint() -> list[list[str]]:
    """scripts/run-tests' lint commands: the words after `lint` on its `lint …` lines."""
    return [words[1:] for words in _lines(RUN_TESTS.read_text()) if words[0] == "lint" and len(words) > 1]


def _default_configfile() -> str:
    match = re.search(r'^configfile:\s*"([^"]+)"', (ROOT / "Snakefile").read_text(), re.M)
    assert match, "the Snakefile names no default configfile"
    return match.group(1)


def _dry_run_key(words: list[str]) -> tuple[str, str | None, tuple[str, ...]] | None:
    """(config file, profile, other arguments) of `snakemake -n …`; None when it is not a dry run."""
    args = words[1:]
    if "-n" not in args and "--dry-run" not in args:
        return None
    config, profile, other = _default_configfile(), None, []
    it = iter(args)
    for arg in it:
        if arg == "--configfile":
            config = next(it)
        elif arg == "--profile":
            profile = next(it)
        elif arg not in ("-n", "--dry-run"):
            other.append(arg)
    return config, profile, tuple(sorted(other))


def _step_problems(job: str, steps: list[dict]) -> list[str]:
    problems = []
    for i, step in enumerate(steps):
        if ("run" in step) == ("uses" in step):
            problems.append(f"{job}: step {i} has {'both `run` and' if 'run' in step else 'neither `run` nor'} `uses`")
    uses = [step["uses"].split("@")[0] for step in steps if "uses" in step]
    if uses[:1] != ["actions/checkout"]:
        problems.append(f"{job}: the first step is not actions/checkout")
    python = [step for step in steps if step.get("uses", "").startswith("actions/setup-python@")]
    if not python or (python[0].get("with") or {}).get("cache") != "pip":
        problems.append(f"{job}: no actions/setup-python with `cache: pip`")
    return problems


def _command_problem(words: list[str], lint: list[list[str]], test_extra: list[str]) -> str | None:
    """Why the suite does not run this command of the workflow (None: it does)."""
    command = " ".join(words)
    if words in PLUMBING or words == ["scripts/setup"]:  # scripts/run-tests' first command
        return None
    if words[0] in ("ruff", "snakefmt"):
        return None if words in lint else f"`{command}` is not one of scripts/run-tests' lint commands"
    if words[:4] == ["python", "-m", "pip", "install"]:
        if words[4:] and all(r in test_extra for r in words[4:]):
            return None
        return f"`{command}` installs other than pyproject.toml's test extra {test_extra}"
    if words[0].endswith("python") and words[1:3] == ["-m", "pytest"]:
        # The suite's default selection, which scripts/run-tests' "slow or not slow" holds.
        return None if words[3:] == ["-m", "not slow"] else f'`{command}`: expected `-m "not slow"` only'
    if words[0] == "snakemake":
        key = _dry_run_key(words)
        if key is None:
            return f"`{command}` is not a dry run (-n)"
        if key not in DRY_RUN_TESTS:
            return f"`{command}` is a dry run no test makes: add one and list it in tests/workflow/test_ci_config.py"
        return None
    return f"`{command}` is run by no test and not by scripts/run-tests"


def _problems(workflow: dict) -> list[str]:
    """Why the workflow is not what the tests run (empty: it is)."""
    problems = []
    jobs = workflow.get("jobs") or {}
    if set(jobs) != JOBS:
        problems.append(f"jobs are {sorted(jobs)}, expected {sorted(JOBS)}")
    triggers = workflow.get("on", workflow.get(True))  # YAML 1.1 reads a bare `on` as true
    if not triggers or "pull_request" not in triggers:
        problems.append("the workflow does not run on pull requests")
    lint = _run_tests_lint()
    test_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    ci_lint = []
    for name, job in jobs.items():
        steps = job.get("steps") or []
        if not job.get("runs-on") or not steps:
            problems.append(f"{name}: no runs-on or no steps")
            continue
        problems += _step_problems(name, steps)
        for words in (words for step in steps for words in _lines(step.get("run", ""))):
            if words[0] in ("ruff", "snakefmt"):
                ci_lint.append(words)
            if problem := _command_problem(words, lint, test_extra):
                problems.append(f"{name}: {problem}")
    problems += [f"scripts/run-tests runs `{' '.join(w)}`, the workflow does not" for w in lint if w not in ci_lint]
    return problems


def _ci_dry_runs() -> list[tuple[str, str | None, tuple[str, ...]]]:
    steps = [step for job in _workflow()["jobs"].values() for step in job["steps"]]
    commands = [words for step in steps for words in _lines(step.get("run", ""))]
    return [key for words in commands if words[0] == "snakemake" and (key := _dry_run_key(words))]


def test_the_workflow_runs_what_the_suite_runs():
    assert _problems(_workflow()) == []


def test_run_tests_sets_up_and_lints_before_pytest():
    """The workflow's `scripts/setup` and pytest steps stand for scripts/run-tests' own."""
    commands = _lines(RUN_TESTS.read_text())
    setup = commands.index(["scripts/setup"])
    lint = next(i for i, words in enumerate(commands) if words[0] == "lint" and len(words) > 1)
    run = next(i for i, words in enumerate(commands) if "pytest" in words)
    assert setup < lint < run
    args = commands[run][commands[run].index("pytest") + 1 :]
    assert args[args.index("-m") + 1] == "slow or not slow", commands[run]
    assert len(_run_tests_lint()) == 3


@pytest.mark.parametrize(
    "added, needle",
    [
        ("make docs", "`make docs` is run by no test"),
        ("snakemake -n --configfile config/gpu.yaml", "is a dry run no test makes"),
        ("snakemake -c1 --configfile config/tiny.yaml", "is not a dry run"),
        ("ruff check --select ALL src", "is not one of scripts/run-tests' lint commands"),
        ("python -m pip install black", "installs other than pyproject.toml's test extra"),
        (".venv/bin/python -m pytest -m slow", 'expected `-m "not slow"` only'),
    ],
)
def test_a_command_the_suite_does_not_run_is_named(added, needle):
    workflow = _workflow()
    before = _problems(workflow)
    workflow["jobs"]["tests"]["steps"].append({"run": added})
    problems = [p for p in _problems(workflow) if p not in before]
    assert len(problems) == 1 and needle in problems[0], problems


def test_a_lint_command_missing_from_the_workflow_is_named():
    workflow = _workflow()
    before = _problems(workflow)
    lint = workflow["jobs"]["lint"]
    lint["steps"] = [step for step in lint["steps"] if "snakefmt --check" not in step.get("run", "")]
    problems = [p for p in _problems(workflow) if p not in before]
    assert problems == ["scripts/run-tests runs `snakefmt --check Snakefile workflow/rules`, the workflow does not"]


def test_a_step_without_run_or_uses_is_named():
    workflow = _workflow()
    steps = workflow["jobs"]["lint"]["steps"]
    steps.append({"name": "nothing"})
    assert f"lint: step {len(steps) - 1} has neither `run` nor `uses`" in _problems(workflow)


def test_every_shipped_config_and_profile_is_dry_run_in_ci():
    runs = _ci_dry_runs()
    configs = {config for config, profile, _ in runs if profile is None}
    assert configs == {f"config/{p.name}" for p in (ROOT / "config").glob("*.yaml")}
    profiles = {profile for _, profile, _ in runs if profile is not None}
    shipped = {f"profiles/{p.name}" for p in (ROOT / "profiles").iterdir() if p.is_dir()}
    # The root's links into profiles/ (`--profile slurm`, the README's command) are looked up apart.
    links = {p.name for p in ROOT.iterdir() if p.is_symlink() and p.resolve().parent == ROOT / "profiles"}
    assert profiles == shipped | links


@pytest.mark.parametrize("key", list(DRY_RUN_TESTS), ids=lambda k: " ".join(filter(None, (k[0], k[1], *k[2]))))
def test_each_listed_dry_run_is_a_test(key):
    """The test named for a dry run exists, runs in every run (not slow), is collected with that
    parameter, dry-runs (-n) and passes the same arguments: renaming or dropping it fails here."""
    module, name, param = DRY_RUN_TESTS[key]
    fn = getattr(importlib.import_module(module), name, None)
    assert callable(fn), f"{module}.{name} does not exist"
    source = inspect.getsource(fn)
    config, profile, other = key
    assert '"-n"' in source and all(f'"{arg}"' in source for arg in other), source
    marks = getattr(fn, "pytestmark", [])
    assert not any(m.name == "slow" for m in marks), f"{name} is marked slow: not in every run"
    parametrize = [m for m in marks if m.name == "parametrize"]
    if param is None:  # the config and the profile are written out in the test
        assert not parametrize
        fixed = [config, profile]
    else:  # one of them is the test's parameter, the other is written out
        (mark,) = parametrize
        values, ids = mark.args[1], mark.kwargs.get("ids")
        assert param in [ids(v) if callable(ids) else str(v) for v in values], f"{name} has no [{param}]"
        assert config == f"config/{param}" or profile == f"profiles/{param}", key
        fixed = [profile] if config == f"config/{param}" else [config]
    assert all(f'"{x}"' in source for x in fixed if x is not None), f"{name} does not name {fixed}"
