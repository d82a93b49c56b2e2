"""docs/add-your-method.md, followed literally: its files written into a temporary copy of the package
and the workflow, its commands run there, its shown outputs compared with what the commands print.

The page marks what this test reads by the title of a fenced block: a block titled with a path
(```python title="src/cryopose/methods/tiny_regressor/__init__.py"```) is written to that path of the
copy; ```text title="cryopose methods"``` is what ``cryopose methods`` prints about the method;
```bash title="dry run"``` and ```bash title="by hand"``` are run as shell scripts; each ``$`` line of a
```console title="refused"``` block is a command that fails with the lines shown after it. The
```bash title="full run"``` block (the whole tiny workflow) is left out: it takes many minutes.
"""

import ast
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from snakemake_runs import _workdir
from test_architecture import JUDGE

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "add-your-method.md"
METHOD = "tiny_regressor"
FENCE = re.compile(r'^```(\w+)(?:[ \t]+title="([^"]*)")?[ \t]*\n(.*?)^```[ \t]*$', re.M | re.S)


def page_blocks() -> list[tuple[str, str | None, str]]:
    """``(language, title or None, text)`` of every fenced block of the page, in order."""
    return [(m.group(1), m.group(2), m.group(3)) for m in FENCE.finditer(PAGE.read_text(encoding="utf-8"))]


def titled(title: str) -> list[str]:
    texts = [text for _, t, text in page_blocks() if t == title]
    assert texts, f"{PAGE.name} has no block titled {title!r}"
    return texts


def run(command: str, work: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    """``command`` as a bash script in ``work``; ``-e``: the first failing line stops it."""
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{command}\nfailed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def dry_run_jobs(output: str, method: str) -> dict[str, int]:
    """{rule: number of jobs} of a dry run's jobs whose wildcards name ``method``."""
    counts: dict[str, int] = {}
    for rule, body in re.findall(r"^(?:local)?rule (\w+):\n(.*?)(?:\n\n|\Z)", output, re.M | re.S):
        if re.search(rf"^\s*wildcards:.*\bmethod={re.escape(method)}(,|$)", body, re.M):
            counts[rule] = counts.get(rule, 0) + 1
    return counts


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_page_links_resolve():
    """The README links to the page, and the page's links to its own and the README's sections exist."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "(docs/add-your-method.md)" in readme
    page = PAGE.read_text(encoding="utf-8")
    prose = re.sub(r"^```.*?^```", "", page, flags=re.M | re.S)  # a comment in a code block is no heading
    anchors = {
        "": {github_anchor(h) for h in re.findall(r"^#+ (.+)$", prose, re.M)},
        "../README.md": {github_anchor(h) for h in re.findall(r"^#+ (.+)$", readme, re.M)},
    }
    links = re.findall(r"\]\(((?:\.\./README\.md)?)#([^)]+)\)", page)
    assert links
    for target, anchor in links:
        assert anchor in anchors[target], f"{target or PAGE.name}#{anchor}: no such section"


def test_page_method_imports_no_judge():
    """The page's method keeps the rule tests/test_architecture.py checks on the shipped methods."""
    for _, title, text in page_blocks():
        if not (title and title.endswith(".py")):
            continue
        package = Path(title).parent.parts[1:]  # src/cryopose/methods/x/y.py → cryopose.methods.x
        imported = set()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = ".".join([*package[: len(package) - node.level + 1], *([node.module] if node.module else [])])
                base = node.module if node.level == 0 else base
                imported |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
        judged = {name for name in imported if any(name == j or name.startswith(j + ".") for j in JUDGE)}
        assert not judged, f"{title} imports the judge: {sorted(judged)}"
        assert "cryopose.data.ParticlesDataset" in imported or title.endswith("model.py")


def test_add_your_method_page(tmp_path):
    # The workflow and a copy of the package, with the page's files added where it says.
    work = _workdir(tmp_path / "work")
    shutil.copytree(ROOT / "src", work / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    assert not (work / "src" / "cryopose" / "methods" / METHOD).exists(), "the page's method must be a new one"
    files = [(title, text) for _, title, text in page_blocks() if title and "/" in title]
    assert {title for title, _ in files} == {
        f"src/cryopose/methods/{METHOD}/__init__.py",
        f"src/cryopose/methods/{METHOD}/model.py",
        f"config/{METHOD}.yaml",
    }
    for title, text in files:
        (work / title).parent.mkdir(parents=True, exist_ok=True)
        (work / title).write_text(text, encoding="utf-8")

    # The copy is the package every command imports: PYTHONPATH comes before the path that the
    # editable install adds (a .pth file), in the commands, in Snakemake and in its jobs alike.
    env = dict(
        os.environ,
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONPATH=os.pathsep.join([str(work / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    env.setdefault("OMP_NUM_THREADS", "1")  # as scripts/run-tests sets it, with two test processes on two cores
    env.pop("CRYOPOSE_BENCHMARK_DIR", None)
    probe = run("python -c 'import cryopose.methods as m; print(m.__file__); print(*m.METHODS)'", work, env)
    where, names = probe.stdout.splitlines()[-2:]
    assert Path(where).resolve() == (work / "src" / "cryopose" / "methods" / "__init__.py").resolve()
    assert METHOD in names.split()

    # `cryopose methods` prints the table the page shows.
    shown = "\n".join(line.rstrip() for line in titled("cryopose methods")[0].strip().splitlines())
    printed = "\n".join(line.rstrip() for line in run("cryopose methods", work, env).stdout.splitlines())
    assert shown.startswith(f"### `{METHOD}`") and shown in printed

    # The dry run schedules the method's jobs, as many as the page says: train and predict for each
    # half of each entry of config/tiny.yaml, evaluate per entry, and the generalisation experiment's.
    out = run(titled("dry run")[0], work, env)
    counts = dry_run_jobs(out.stdout + out.stderr, METHOD)
    tiny = yaml.safe_load((work / "config" / "tiny.yaml").read_text())
    n = len(tiny["entries"])
    transfers = sum(METHOD in t.get("methods", [METHOD]) for t in tiny.get("generalisation", []))
    expected = {"train": 2 * n, "predict": 2 * n, "evaluate": n}
    if transfers:
        expected.update(predict_transfer=2 * transfers, evaluate_transfer=transfers)
    assert counts == expected
    stated = re.search(r"shows the new jobs, (\d+) of them", PAGE.read_text(encoding="utf-8"))
    assert stated and int(stated.group(1)) == sum(counts.values())
    assert not (work / "results").exists() and not (work / "resources").exists()

    # By hand: simulate an entry, train on each half, cross-predict, evaluate, make a leaderboard.
    run(titled("by hand")[0], work, env)
    records = sorted(work.rglob("model.json"))
    assert len(records) == 2
    for record in records:
        facts = json.loads(record.read_text())
        assert facts["method"] == METHOD and math.isfinite(facts["final_loss"])
    boards = list(work.rglob("leaderboard.csv"))
    assert len(boards) == 1
    row = pd.read_csv(boards[0]).set_index("method").loc[METHOD]
    assert 0 <= row["MAnE"] <= 180  # finite
    assert row["shift_error_mean_A"] >= 0  # SO3xR2: the origins were scored

    # Each refused command fails as the page shows.
    commands = [c for block in titled("refused") for c in re.findall(r"^\$ (.+)\n((?:(?!\$ ).*\n?)*)", block, re.M)]
    assert len(commands) >= 3
    for command, expected_error in commands:
        proc = run(command, work, env, check=False)
        assert proc.returncode == 2, (command, proc.stdout, proc.stderr)
        assert expected_error.strip() and expected_error.strip() in proc.stderr, (command, proc.stderr)
