"""RELION's 3D auto-refine as a benchmark method: the classical pipeline practitioners run.

``relion_refine --auto_refine`` (Debian's RELION 3.1.3) refines one half of an entry blind — its
poses and shifts removed — starting from the other half's ground-truth map, which RELION low-passes
to ``ini_high_A`` (the paper's section 1.1 starts refinements from a 30–40 Å model). Gold-standard
auto-refine splits the particles into two random halves, which RELION allows only under MPI:
``mpirun -np N relion_refine_mpi`` with N ≥ 3 (one leader, one follower per half). Its final
``run_data.star`` gives the predictions: angles, origins in Å, and ``rlnMaxValueProbDistribution``
as the confidence.

Parameters and why (:class:`RelionRefineConfig`): the sampling is RELION's default for auto-refine
(HEALPix order 2 = 7.5°, local searches from order 4, translations of ±5 px every 2 px —
the simulated shifts have σ = 2 px); ``--firstiter_cc`` because the reference is our reconstruction,
not on RELION's absolute intensity scale; ``--ctf`` with the entry's CTF; ``--flatten_solvent
--zero_mask`` inside a circular mask of ``particle_diameter_A`` (default 90 % of the box);
``--low_resol_join_halves 40`` as RELION's GUI does.

Measured: on a 131 Å box (32 px at 4.1 Å, 2 × 100 particles) RELION cannot align from 40 Å — three
Fourier shells — and ends 41–89° from the truth, warning that its angular accuracy is worse than
10°; from 20 Å it recovers the poses (median 4°). Real entries' boxes are 300–500 Å wide, where
40 Å is the usual start; on the small synthetic boxes set ``ini_high_A`` near 20.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import io
from ...entry import Entry
from ...errors import InputError
from ...parameters import param, validate
from ...predictions import EULER, ORIGIN, write_predictions
from ...reconstruct import RelionNotFound

__all__ = ["RelionRefineConfig", "auto_refine_command", "blind_particles", "auto_refine_half", "relion_environment"]

POSE_COLUMNS = [
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
    "rlnOriginX",
    "rlnOriginY",
    "rlnMaxValueProbDistribution",
    "rlnRandomSubset",
    "rlnClassNumber",
    "rlnNormCorrection",
    "rlnLogLikeliContribution",
    "rlnNrOfSignificantSamples",
    "rlnGroupNumber",
    "rlnAnglePsiPrior",
    "rlnAngleTiltPrior",
    "rlnAngleRotPrior",
]


@dataclass(frozen=True)
class RelionRefineConfig:
    """Options of ``relion_refine --auto_refine``; see the module docstring for the choices."""

    ini_high_A: float = param(
        40.0, "Å: low-pass of the starting reference (the paper starts at 30–40 Å; ~20 on small boxes)", above=0
    )
    healpix_order: int = param(2, "initial angular sampling (2: 7.5°)", min=0)
    auto_local_healpix_order: int = param(4, "order from which RELION searches locally", min=0)
    offset_range_px: float = param(5.0, "pixels: translational search range", min=0)
    offset_step_px: float = param(2.0, "pixels: translational search step", above=0)
    particle_diameter_A: float | None = param(None, "Å: mask diameter (default 90 % of the box)", above=0)
    low_resol_join_halves_A: float = param(40.0, "Å: resolution below which the two halves are joined", above=0)
    pad: int = param(2, "padding factor of RELION's Fourier grid", min=1)
    mpi_processes: int = param(3, "mpirun -np N (≥ 3: a leader and one process per half)", min=3)
    threads: int = param(1, "threads per MPI process (relion_refine --j)", min=1)
    firstiter_cc: bool = param(
        True, "cross-correlation in the first iteration (our reference is not on RELION's scale)"
    )
    launcher: str = param("", "command prefix, e.g. 'apptainer exec relion.sif'")
    extra_args: str = param("", "more relion_refine options, split as a shell would")

    def __post_init__(self):
        validate(self)  # the bounds declared above
        if self.healpix_order > self.auto_local_healpix_order:
            raise ValueError(
                f"healpix_order ({self.healpix_order}) must be <= auto_local_healpix_order "
                f"({self.auto_local_healpix_order})"
            )


def auto_refine_command(
    config: RelionRefineConfig,
    particles: Path,
    reference: Path,
    out_prefix: Path,
    symmetry: str,
    particle_diameter_A: float,
) -> list[str]:
    """The command line (program, MPI launcher and options) of one auto-refine run."""
    cmd = shlex.split(config.launcher) + ["mpirun", "-np", str(config.mpi_processes)]
    if config.mpi_processes > (os.cpu_count() or 1):
        cmd.append("--oversubscribe")  # Open MPI refuses more processes than cores otherwise
    cmd += [
        "relion_refine_mpi",
        "--o",
        str(out_prefix),
        "--i",
        str(particles),
        "--ref",
        str(reference),
        "--auto_refine",
        "--split_random_halves",
        "--ini_high",
        f"{config.ini_high_A:g}",
        "--ctf",
        "--particle_diameter",
        f"{particle_diameter_A:.1f}",
        "--flatten_solvent",
        "--zero_mask",
        "--oversampling",
        "1",
        "--healpix_order",
        str(config.healpix_order),
        "--auto_local_healpix_order",
        str(config.auto_local_healpix_order),
        "--offset_range",
        f"{config.offset_range_px:g}",
        "--offset_step",
        f"{config.offset_step_px:g}",
        "--sym",
        symmetry,
        "--low_resol_join_halves",
        f"{config.low_resol_join_halves_A:g}",
        "--pad",
        str(config.pad),
        "--dont_combine_weights_via_disc",
        "--j",
        str(config.threads),
    ]
    if config.firstiter_cc:
        cmd.append("--firstiter_cc")
    return cmd + shlex.split(config.extra_args)


def _normalised_name(name: str) -> str:
    """``12@/a/./b.mrcs`` → ``000012@/a/b.mrcs``: the six-digit index RELION writes, the path normalised."""
    index, stack = name.split("@", 1)
    return f"{int(index):06d}@{os.path.normpath(stack)}"


def blind_particles(entry: Entry, half: int, dest: Path) -> dict[str, str]:
    """Write ``dest``: half ``half``'s particles without poses, confidences or subsets, image names
    absolute (RELION resolves them against its working directory) and random subsets alternating
    1, 2 (RELION keeps subsets it finds; the entry's put every particle in one). Returns the map
    from the absolute image names (as :func:`_normalised_name` writes them) back to the entry's."""
    star = entry.read_star(half)
    parts = star.particles.drop(columns=[c for c in POSE_COLUMNS if c in star.particles.columns])
    names = {}
    absolute = []
    for row, name in enumerate(parts["rlnImageName"].astype(str)):
        index, stack = io.parse_image_name(name, star.path, row)
        full = _normalised_name(f"{index + 1}@{io.resolve_stack_path(star.path, stack)}")
        names[full] = name
        absolute.append(full)
    parts = parts.assign(rlnImageName=absolute, rlnRandomSubset=(np.arange(len(parts)) % 2) + 1)
    io.write_particles_star(dest, io.ParticleStar(star.optics.copy(), parts))
    return names


def relion_environment() -> dict[str, str]:
    """The environment RELION's MPI runs get: Open MPI allowed to run as root (containers, CI) and
    idle processes yielding the CPU (the leader otherwise spins on a core the followers need when
    the run is oversubscribed). Values already set by the user win."""
    env = dict(os.environ)
    for key, value in (
        ("OMPI_ALLOW_RUN_AS_ROOT", "1"),
        ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1"),
        ("OMPI_MCA_mpi_yield_when_idle", "1"),
    ):
        env.setdefault(key, value)
    return env


def auto_refine_half(
    entry: Entry,
    half: int,
    reference: str | Path,
    out_star: str | Path,
    config: RelionRefineConfig = RelionRefineConfig(),
    work_dir: str | Path | None = None,
    log_path: str | Path | None = None,
) -> float:
    """Refine half ``half`` of ``entry`` from ``reference`` and write the predictions STAR.

    The run lives in ``work_dir`` (default: a temporary folder beside ``out_star``, removed
    afterwards). Returns the wall time of ``relion_refine`` in seconds.

    Raises:
        RelionNotFound: when the launcher's or mpirun's program is not on PATH.
        InputError: a reference of another box or pixel size than the particles'.
        RuntimeError: RELION failed or wrote no final ``run_data.star`` (its output's tail included).
    """
    out_star = Path(out_star)
    reference = Path(reference).resolve()
    volume, ref_px = io.read_map(reference)
    if volume.shape[0] != entry.box_size or abs(ref_px - entry.pixel_size) > 1e-3 * entry.pixel_size:
        raise InputError(
            f"reference of {volume.shape[0]} px at {ref_px:g} Å/px, the particles are "
            f"{entry.box_size} px at {entry.pixel_size:g} Å/px",
            path=reference,
        )
    cmd0 = shlex.split(config.launcher)[:1] or ["mpirun"]
    for program in (cmd0[0], "mpirun") if config.launcher else ("mpirun", "relion_refine_mpi"):
        if shutil.which(program) is None:
            raise RelionNotFound(
                f"{program} not found on PATH (Debian/Ubuntu: apt-get install relion openmpi-bin; "
                f"or configure an Apptainer launcher)",
                where="relion_refine",
            )
    diameter = config.particle_diameter_A or 0.9 * entry.box_size * entry.pixel_size
    out_star.parent.mkdir(parents=True, exist_ok=True)
    # RELION's run folder: the caller's (kept), or a scratch folder beside the output, removed on
    # any exit (SIGTERM included) and, if a killed run left one, by the next run.
    with contextlib.ExitStack() as scratch:
        if work_dir is None:
            work = scratch.enter_context(io.temporary_folder(out_star.parent, "relion_refine"))
        else:
            work = Path(work_dir)
            work.mkdir(parents=True, exist_ok=True)
        names = blind_particles(entry, half, work / "particles.star")
        cmd = auto_refine_command(config, work / "particles.star", reference, work / "run", entry.symmetry, diameter)
        started = time.monotonic()
        with open(log_path or work / "relion_refine.log", "w") as log:
            log.write(f"$ {shlex.join(cmd)}\n")
            log.flush()
            proc = subprocess.run(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=relion_environment())
        seconds = time.monotonic() - started
        result = work / "run_data.star"
        if proc.returncode != 0 or not result.is_file():
            tail = Path(log_path or work / "relion_refine.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(
                f"{shlex.join(cmd)} failed (exit {proc.returncode}, run_data.star "
                f"{'present' if result.is_file() else 'missing'}):\n{tail}"
            )
        refined = io.read_particles_star(result).particles
        original = [names.get(_normalised_name(n)) for n in refined["rlnImageName"].astype(str)]
        if any(o is None for o in original) or len(set(original)) != len(names):
            raise RuntimeError(f"{result}: its particles are not those of {entry.star_path(half)}")
        star = entry.read_star(half)
        refined = refined.set_axis(original).loc[star.particles["rlnImageName"].astype(str)]
        write_predictions(
            entry,
            half,
            out_star,
            angles_deg=refined[EULER].to_numpy(dtype=np.float64),
            shifts_angstrom=refined[ORIGIN].to_numpy(dtype=np.float64),
            confidence=refined["rlnMaxValueProbDistribution"].to_numpy(dtype=np.float64),
        )
        return seconds
