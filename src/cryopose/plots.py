"""Figures of an evaluation (FSC curves, angular-error histogram, orientation coverage), of the
generalisation experiment and of the sensitivity experiment (a method's own figures, such as
Image2Sphere's training curves, live in its folder).

Each function takes the tables :func:`cryopose.evaluate.evaluate` produces and writes one PNG
atomically. matplotlib runs headless (Agg); healpy draws the Mollweide maps. Axis labels come from
:mod:`cryopose.metric_table`; this module imports none of the modules whose tables it draws
(leaderboard, sensitivity): they pass in what it needs.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from . import io  # noqa: E402
from .geometry import euler_to_matrix  # noqa: E402
from .metric_table import heading  # noqa: E402

__all__ = [
    "plot_fsc",
    "plot_angular_errors",
    "plot_orientations",
    "viewing_directions",
    "plot_generalisation",
    "plot_sensitivity",
    "plot_sensitivity_fsc",
]

_PAIRS = {
    "(GT,V)": ("GT vs V (predicted)", "C0"),
    "(V0,V1)": ("V0 vs V1 (predicted halves)", "C1"),
    "(GT0,GT1)": ("GT0 vs GT1 (ground-truth halves)", "C2"),
}


def _save(fig, path: Path) -> None:
    with io.atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_fsc(fsc: pd.DataFrame, metrics: dict, path: str | Path) -> None:
    """FSC curves of the three map pairs, unmasked (solid) and masked (dashed), with both thresholds."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    f = fsc["frequency_per_A"].to_numpy()
    for pair, (label, colour) in _PAIRS.items():
        res = metrics.get(f"FSCR0.143{pair}")
        ax.plot(
            f[1:],
            fsc[f"FSC{pair}"].to_numpy()[1:],
            color=colour,
            label=f"{label}: {res:.2f} Å at 0.143" if res else label,
        )
        if f"masked_FSC{pair}" in fsc and fsc[f"masked_FSC{pair}"].notna().all():
            ax.plot(f[1:], fsc[f"masked_FSC{pair}"].to_numpy()[1:], color=colour, ls="--", lw=1)
    for t in (0.143, 0.5):
        ax.axhline(t, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.02)
    ax.set_xlim(0, f[-1])
    top = ax.secondary_xaxis("top", functions=(lambda x: 1 / np.maximum(x, 1e-6), lambda r: 1 / np.maximum(r, 1e-6)))
    top.set_xlabel("resolution (Å)")
    ticks = [r for r in (50, 20, 10, 8, 6, 5, 4, 3, 2) if 1 / r <= f[-1]]
    top.set_xticks(ticks)
    ax.set_title(f"{metrics.get('entry', '')}: FSC (solid unmasked, dashed masked)")
    ax.legend(fontsize=8, loc="upper right")
    _save(fig, Path(path))


def plot_angular_errors(particles: pd.DataFrame, metrics: dict, path: str | Path) -> None:
    """Histogram of the symmetry-aware angular errors of both halves, with MAnE and median marked."""
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(0, 180, 73)
    for h, group in particles.groupby("half"):
        ax.hist(group["angular_error_deg"], bins=bins, alpha=0.6, label=f"half {h} ({len(group)} particles)")
    for key, style in (("MAnE", "-"), ("median_angular_error", "--")):
        if metrics.get(key) is not None:
            ax.axvline(metrics[key], color="k", ls=style, lw=1, label=f"{key.replace('_', ' ')} {metrics[key]:.1f}°")
    ax.set_xlabel(f"angular error (°, {metrics.get('symmetry', 'C1')}-aware)")
    ax.set_ylabel("particles")
    ax.set_xlim(0, 180)
    ax.legend(fontsize=8)
    ax.set_title(f"{metrics.get('entry', '')}: angular error of the predicted poses")
    _save(fig, Path(path))


def viewing_directions(angles_deg: np.ndarray) -> np.ndarray:
    """``(N, 3)`` unit projection directions in the map's frame for ``(N, 3)`` (rot, tilt, psi).

    With ``R`` mapping image coordinates into the volume, the beam (the image's z axis) points
    along ``R·ẑ``: its polar angle is the tilt, its azimuth the rot angle.
    """
    rot = euler_to_matrix(torch.as_tensor(np.asarray(angles_deg, dtype=np.float64)))
    return rot[..., :, 2].numpy()


def plot_orientations(particles: pd.DataFrame, path: str | Path, nside: int = 8) -> None:
    """Mollweide maps (HEALPix, ``nside``) of how many particles view the map from each direction,
    for the true and the predicted poses side by side."""
    import healpy as hp

    npix = hp.nside2npix(nside)
    fig = plt.figure(figsize=(11, 3.8))
    counts = {}
    for which in ("true", "pred"):
        dirs = viewing_directions(
            particles[[f"{which}_rlnAngleRot", f"{which}_rlnAngleTilt", f"{which}_rlnAnglePsi"]].to_numpy()
        )
        pix = hp.vec2pix(nside, dirs[:, 0], dirs[:, 1], dirs[:, 2])
        counts[which] = np.bincount(pix, minlength=npix).astype(float)
    vmax = max(c.max() for c in counts.values())
    for i, (which, title) in enumerate((("true", "ground-truth poses"), ("pred", "predicted poses"))):
        hp.mollview(
            counts[which],
            fig=fig.number,
            sub=(1, 2, i + 1),
            title=f"{title} (particles per pixel)",
            min=0,
            max=vmax,
            cmap="viridis",
            unit="particles",
            hold=False,
        )
        hp.graticule(dpar=30, dmer=60, alpha=0.3)
    _save(fig, Path(path))


def plot_generalisation(table: pd.DataFrame, path: str | Path) -> None:
    """Per method and source entry, MAnE and ΔFSCR0.5 in distribution (the source entry's own other
    half) next to transfer (another entry), from :func:`cryopose.leaderboard.generalisation_table`."""
    groups = list(table.groupby(["method", "trained_on"], sort=True))
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 2.4 * len(groups) + 2), 4.5))
    colours = {"in-distribution": "C0", "transfer": "C3"}
    x = np.arange(len(groups))
    labels = []
    for (method, source), g in groups:
        targets = ", ".join(sorted(g[g["setting"] == "transfer"]["entry"].astype(str)))
        labels.append(f"{method}\n{source} → {targets or '–'}")
    for ax, col in zip(axes, ("MAnE", "delta_FSCR0.5")):
        label = heading(col)
        for k, setting in enumerate(("in-distribution", "transfer")):
            values = [
                float(pd.to_numeric(g[g["setting"] == setting][col], errors="coerce").mean())
                if (g["setting"] == setting).any()
                else np.nan
                for _, g in groups
            ]
            ax.bar(x + (k - 0.5) * 0.38, values, width=0.38, color=colours[setting], label=setting)
        ax.set_xticks(x, labels, fontsize=7, rotation=20, ha="right")
        ax.set_ylabel(label)
        ax.axhline(0, color="k", lw=0.6)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "Generalisation: models applied to another entry of the same molecule\n"
        "(compare Δs with the ground_truth row of the same entry: its offset is the half-maps' noise)",
        fontsize=10,
    )
    fig.tight_layout()
    _save(fig, Path(path))


def plot_sensitivity(table: pd.DataFrame, path: str | Path, experiments: dict, metrics: list[str]) -> None:
    """The paper's Tables 4–5 as lines: each of ``metrics`` (e.g. PCC(V0,V1) unmasked and masked,
    FSC(V0,V1) resolutions) against the perturbation level, one line per entry; left column random
    poses, right column angular noise. ``table`` from :func:`cryopose.sensitivity.sensitivity_table`;
    ``experiments``: experiment → (label, unit of the level), as :data:`cryopose.sensitivity.EXPERIMENTS`."""
    names = [e for e in ("random", "noise") if (table["experiment"] == e).any()]
    fig, axes = plt.subplots(
        len(metrics), len(names), figsize=(4.6 * len(names), 2.8 * len(metrics)), squeeze=False, sharex="col"
    )
    for j, experiment in enumerate(names):
        t = table[table["experiment"] == experiment]
        label, unit = experiments[experiment]
        for i, col in enumerate(metrics):
            ylabel = heading(col)
            ax = axes[i, j]
            for k, (entry, g) in enumerate(t.groupby("entry")):
                g = g.sort_values("level")
                ax.plot(g["level"], g[col], "o-", color=f"C{k}", label=str(entry))
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if i == len(metrics) - 1:
                ax.set_xlabel(f"{label} ({unit})")
        axes[0, j].set_title(label)
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("Sensitivity of the map metrics to misalignment of the ground-truth poses", fontsize=10)
    fig.tight_layout()
    _save(fig, Path(path))


def plot_sensitivity_fsc(curves: dict, path: str | Path, experiments: dict) -> None:
    """The paper's Figures 4–5: FSC(V0,V1) curves (the perturbed half-maps) per entry (rows) at each
    level of random poses (left) and angular noise (right). ``curves``: ``{(entry, experiment,
    level): fsc table}`` (the ``fsc.csv`` of :func:`cryopose.evaluate.evaluate`; the unperturbed
    evaluation is level 0 of both experiments); ``experiments``: experiment → (label, unit)."""
    entries = sorted({e for e, _, _ in curves})
    fig, axes = plt.subplots(len(entries), 2, figsize=(10, 3.2 * len(entries)), squeeze=False)
    for i, entry in enumerate(entries):
        for j, experiment in enumerate(("random", "noise")):
            ax = axes[i, j]
            levels = sorted(lv for e, x, lv in curves if e == entry and x == experiment)
            for k, level in enumerate(levels):
                fsc = curves[(entry, experiment, level)]
                f = fsc["frequency_per_A"].to_numpy()[1:]
                unit = experiments[experiment][1]
                ax.plot(
                    f, fsc["FSC(V0,V1)"].to_numpy()[1:], color=f"C{k}", label=f"{level:g}{'%' if unit == '%' else '°'}"
                )
            for t in (0.143, 0.5):
                ax.axhline(t, color="grey", lw=0.6, ls=":")
            ax.set_ylim(-0.1, 1.02)
            ax.set_title(f"{entry}: {experiments[experiment][0]}", fontsize=9)
            ax.set_xlabel("spatial frequency (1/Å)")
            ax.set_ylabel("FSC(V0, V1)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, Path(path))
