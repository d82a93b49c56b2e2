"""A RELION project made of a simulated entry, written by hand in RELION's own forms (``# version
30001`` blocks, ``loop_`` tables, ``job.star`` options), not by cryopose's writer: a refinement's
``Refine3D/job020/run_data.star`` holding both halves interleaved (rlnRandomSubset), two optics
groups, image names relative to the project's root, per-micrograph stacks under
``Extract/job012/Movies`` (one with an older MRC header), the job's ``job.star`` (``sym_name``,
``fn_mask``) and its mask. The entry's images and poses are read with the independent
``starfile`` and ``mrcfile`` packages. Used by tests/io/test_relion_project.py and the workflow test."""

from __future__ import annotations

import shutil
from pathlib import Path

import mrcfile
import numpy as np
import starfile

N_MICROGRAPHS = 3
OPTICS_31 = (
    "rlnOpticsGroupName",
    "rlnOpticsGroup",
    "rlnMicrographOriginalPixelSize",
    "rlnVoltage",
    "rlnSphericalAberration",
    "rlnAmplitudeContrast",
    "rlnImagePixelSize",
    "rlnImageSize",
    "rlnImageDimensionality",
)
PARTICLES_31 = (
    "rlnCoordinateX",
    "rlnCoordinateY",
    "rlnImageName",
    "rlnMicrographName",
    "rlnOpticsGroup",
    "rlnDefocusU",
    "rlnDefocusV",
    "rlnDefocusAngle",
    "rlnCtfBfactor",
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
    "rlnClassNumber",
    "rlnMaxValueProbDistribution",
    "rlnRandomSubset",
)


def _loop(block: str, columns, rows) -> str:
    """A STAR table as RELION 3.1 writes one (``loop_ `` and ``#n `` with their trailing blanks)."""
    head = f"\n# version 30001\n\ndata_{block}\n\nloop_ \n" + "".join(
        f"_{c} #{i + 1} \n" for i, c in enumerate(columns)
    )
    return head + "".join(
        " ".join(f"{v:>12}" if not isinstance(v, float) else f"{v:12.6f}" for v in r) + " \n" for r in rows
    )


def _older_header(path: Path) -> None:
    """What older writers leave: no ``MAP `` string (bytes 208-211) and a zero machine stamp (212-215)."""
    raw = bytearray(path.read_bytes())
    raw[208:216] = bytes(8)
    path.write_bytes(bytes(raw))


def make_relion_project(source: Path, root: Path) -> Path:
    """``source`` rearranged as a RELION project: particles of both halves interleaved in one
    ``Refine3D/job020/run_data.star``, images in per-micrograph stacks under ``Extract/job012``."""
    optics = starfile.read(source / "particles_0.star")["optics"].iloc[0]
    halves = [starfile.read(source / f"particles_{h}.star")["particles"] for h in (0, 1)]
    stacks = [mrcfile.mmap(source / f"particles_{h}.mrcs", mode="r").data for h in (0, 1)]
    order = [(h, i) for i in range(len(halves[0])) for h in (0, 1)]  # h0, h1, h0, h1, ...
    mics = np.array_split(np.arange(len(order)), N_MICROGRAPHS)
    (root / "Extract/job012/Movies").mkdir(parents=True)
    rows = []
    for m, members in enumerate(mics):
        stack = f"Extract/job012/Movies/mic_{m + 1:03d}.mrcs"
        images = np.stack(
            [
                stacks[order[k][0]][int(halves[order[k][0]]["rlnImageName"].iloc[order[k][1]].split("@")[0]) - 1]
                for k in members
            ]
        )
        with mrcfile.new(root / stack) as mrc:
            mrc.set_data(images.astype(np.float32))
            mrc.voxel_size = float(optics["rlnImagePixelSize"])
        for j, k in enumerate(members):
            h, i = order[k]
            p = halves[h].iloc[i]
            rows.append(
                (
                    100.0 + j,
                    200.0 + j,
                    f"{j + 1:06d}@{stack}",
                    f"MotionCorr/job002/Movies/mic_{m + 1:03d}.mrc",
                    1 + m % 2,
                )
                + tuple(float(p[c]) for c in ("rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnCtfBfactor"))
                + tuple(float(p[c]) for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"))
                + (
                    float(p["rlnOriginXAngst"]),
                    float(p["rlnOriginYAngst"]),
                    1,
                    float(p["rlnMaxValueProbDistribution"]),
                    h + 1,
                )
            )
    _older_header(root / "Extract/job012/Movies/mic_002.mrcs")
    px, box = float(optics["rlnImagePixelSize"]), int(optics["rlnImageSize"])
    groups = [
        (
            f"opticsGroup{g}",
            g,
            1.0,
            float(optics["rlnVoltage"]),
            float(optics["rlnSphericalAberration"]),
            float(optics["rlnAmplitudeContrast"]),
            px,
            box,
            2,
        )
        for g in (1, 2)
    ]
    job = root / "Refine3D/job020"
    job.mkdir(parents=True)
    (job / "run_data.star").write_text(
        _loop("optics", OPTICS_31, groups) + "\n" + _loop("particles", PARTICLES_31, rows)
    )
    (job / "job.star").write_text(
        "\n# version 30001\n\ndata_job\n\n_rlnJobType                             2\n"
        "_rlnJobIsContinue                       0\n"
        + _loop(
            "joboptions_values",
            ("rlnJobOptionVariable", "rlnJobOptionValue"),
            [("sym_name", "C4"), ("fn_mask", "MaskCreate/job015/mask.mrc"), ("particle_diameter", "60")],
        )
    )
    (root / "MaskCreate/job015").mkdir(parents=True)
    shutil.copy(source / f"{source.name}_mask.mrc", root / "MaskCreate/job015/mask.mrc")
    return root
