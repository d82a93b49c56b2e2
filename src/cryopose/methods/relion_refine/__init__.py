"""``relion_refine``: the classical pipeline practitioners run (paper section 1.1, Appendix G).

RELION's 3D auto-refine of the blind test half (poses and shifts removed) from the training
half's map low-passed to ``ini_high_A`` (:mod:`.auto_refine`). The "model" is that map.
"""

from __future__ import annotations

from ...reconstruct import write_half_map
from .. import Method, Resources
from .auto_refine import RelionRefineConfig, auto_refine_half

#: The parameters are the options of ``relion_refine --auto_refine``.
Params = RelionRefineConfig


def train(entry, half, model_dir, params, work_dir=None):
    write_half_map(entry, half, model_dir / "reference.mrc")


def predict(model_dir, entry, half, out_star, params: RelionRefineConfig):
    seconds = auto_refine_half(
        entry, half, model_dir / "reference.mrc", out_star, params, log_path=out_star.with_suffix(".relion_refine.log")
    )
    print(f"relion_refine: {seconds:.0f} s", flush=True)


def resources(method, params: RelionRefineConfig) -> dict[str, Resources]:
    """An auto-refine of a real half runs for hours on ``mpi_processes × threads`` cores."""
    return {
        "train": Resources(mem_mb=8000, runtime_min=24 * 60),
        "predict": Resources(threads=params.mpi_processes * params.threads, mem_mb=8000, runtime_min=24 * 60),
    }


METHOD = Method(
    "relion_refine",
    "classical pipeline (paper section 1.1, Appendix G): RELION 3D auto-refine of the "
    "blind test half from the training half's map low-passed to 40 Å",
    "SO3xR2",
    Params,
    train,
    predict,
    resources=resources,
)
