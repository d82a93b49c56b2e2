"""Helpers shared by the benchmark scripts: the ``--json`` rows that ``benchmarks/run_all`` gathers.

A row is one figure measured on both sides in the same run::

    {"figure": str, "ours": float, "reference": float | None, "ratio": float | None,
     "unit": str, "reference_name": str}

``ratio`` > 1 favours cryopose: reference / ours for costs (seconds, megabytes), ours / reference
for rates and scores (images per second, PCC). Extra keys are allowed (``run_all`` ignores them in
the main table, or routes rows with a ``table`` key to their own table).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
from pathlib import Path


def add_output_args(parser: argparse.ArgumentParser, quick_help: str | None = None) -> None:
    """``--json PATH`` and ``--quick`` (tiny sizes for a smoke test; the text says which)."""
    parser.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        help="also write the key figures as a JSON list of rows (for benchmarks/run_all)",
    )
    parser.add_argument(
        "--quick", action="store_true", help=quick_help or "tiny sizes, for a smoke test (the figures mean nothing)"
    )


def row(
    figure: str, ours: float, reference: float | None, unit: str, reference_name: str, lower_is_better: bool, **extra
) -> dict:
    """One figure with its ratio oriented so that > 1 favours cryopose."""
    ours = _number(ours)
    reference = _number(reference)
    ratio = None
    if ours is not None and reference is not None and ours > 0 and reference > 0:
        ratio = reference / ours if lower_is_better else ours / reference
    return {
        "figure": figure,
        "ours": ours,
        "reference": reference,
        "ratio": ratio,
        "unit": unit,
        "reference_name": reference_name,
        "lower_is_better": lower_is_better,
        **extra,
    }


def _number(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def write_rows(path: Path | None, rows: list[dict]) -> None:
    """Write ``rows`` to ``path`` (atomically: a reader never sees half a file); no-op without a path."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(rows, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def cesped_name(python: str | os.PathLike | None) -> str:
    """``CESPED <version>`` of the environment at ``python`` (``CESPED`` if it cannot be asked)."""
    if python and Path(python).is_file():
        try:
            out = subprocess.run(
                [str(python), "-c", "import importlib.metadata as m; print(m.version('cesped'))"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            if out.returncode == 0 and out.stdout.strip():
                return f"CESPED {out.stdout.strip()}"
        except (OSError, subprocess.SubprocessError):
            pass
    return "CESPED"


def relion_name() -> str:
    """``relion_reconstruct <version>`` of the one on PATH."""
    exe = shutil.which("relion_reconstruct")
    if exe:
        try:
            out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
            for line in (out.stdout + out.stderr).splitlines():
                if "version" in line.lower():
                    return f"relion_reconstruct {line.split(':', 1)[-1].strip()}"
        except (OSError, subprocess.SubprocessError):
            pass
    return "relion_reconstruct"
