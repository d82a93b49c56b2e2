"""The benchmark's metrics: pose errors, and real- and Fourier-space comparisons of maps.

Pose metrics take rotation matrices in the scipy-ZYZ convention (see :mod:`cryopose.geometry`)
and return degrees; shifts are in Å. Map metrics take cubic ``(D, D, D)`` maps with the pixel size
in Å and return plain Python floats, so their results serialise to JSON as they are.

A map metric that is undefined is NaN, never a number standing in for it: a map that is zero,
constant or holds NaN/infinity (:func:`map_degeneracy`) has no PCC and no FSC, and an FSC curve
that is undefined (0/0: a map without power in a shell) before it crosses a threshold has no
resolution. :class:`MapComparison` says why for each NaN (:meth:`MapComparison.null_reasons`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .symmetry import symmetry_aware_angle

__all__ = [
    "angular_errors",
    "pose_error_summary",
    "shift_errors",
    "pearson_correlation",
    "fsc_curve",
    "fsc_resolution",
    "MapComparison",
    "compare_maps",
    "map_degeneracy",
    "cesped_fsc_resolution",
    "FSC_THRESHOLDS",
    "ACCURACY_THRESHOLDS_DEG",
]

FSC_THRESHOLDS = (0.143, 0.5)
ACCURACY_THRESHOLDS_DEG = (5.0, 10.0, 15.0, 30.0)
_SLAB = 16  # Fourier planes per chunk in fsc_curve: bounds the temporaries to a few MB
_CHUNK = 1 << 20  # voxels per chunk in pearson_correlation


# ---------------------------------------------------------------------------------------------
# Poses
# ---------------------------------------------------------------------------------------------


def angular_errors(true_rotmats: torch.Tensor, pred_rotmats: torch.Tensor, symmetry: str = "C1") -> torch.Tensor:
    """Per-particle symmetry-aware angular error (paper eq. 5): ``min_g angle(g·R_true, R_pred)``.

    Args:
        true_rotmats, pred_rotmats: ``(N, 3, 3)``.
        symmetry: point group of the map (RELION names: C1, C4, D2, T, O, I, ...).

    Returns:
        ``(N,)`` float64 degrees in [0, 180].
    """
    true_rotmats = torch.as_tensor(true_rotmats, dtype=torch.float64)
    pred_rotmats = torch.as_tensor(pred_rotmats, dtype=torch.float64)
    if true_rotmats.shape != pred_rotmats.shape or true_rotmats.shape[-2:] != (3, 3):
        raise ValueError(
            f"angular_errors: expected two (N, 3, 3) stacks of one shape, got "
            f"{tuple(true_rotmats.shape)} and {tuple(pred_rotmats.shape)}"
        )
    return symmetry_aware_angle(true_rotmats, pred_rotmats, symmetry)


def pose_error_summary(
    errors_deg, confidence=None, accuracy_thresholds_deg: tuple[float, ...] = ACCURACY_THRESHOLDS_DEG
) -> dict[str, float]:
    """Summary statistics of per-particle angular errors.

    Args:
        errors_deg: ``(N,)`` angular errors in degrees.
        confidence: ``(N,)`` ground-truth confidence (rlnMaxValueProbDistribution, in [0, 1]) used as
            the weight of wMAnE (paper eq. 6); ``None`` weights every particle equally, which makes
            wMAnE equal MAnE.
        accuracy_thresholds_deg: thresholds of the ``acc_<t>deg`` fractions.

    Returns:
        ``{"n", "MAnE", "wMAnE", "median_angular_error", "acc_5deg", ...}``: the mean, the
        confidence-weighted mean and the median error in degrees, and the fraction of particles whose
        error is at most each threshold (in [0, 1]).
    """
    err = torch.as_tensor(np.array(errors_deg, dtype=np.float64)).reshape(-1)
    if err.numel() == 0:
        raise ValueError("pose_error_summary: no errors to summarise")
    if not torch.isfinite(err).all():
        raise ValueError("pose_error_summary: errors contain NaN or infinity")
    if confidence is None:
        weights = torch.ones_like(err)
    else:
        weights = torch.as_tensor(np.array(confidence, dtype=np.float64)).reshape(-1)
        if weights.shape != err.shape:
            raise ValueError(f"pose_error_summary: {weights.numel()} confidences for {err.numel()} errors")
        if not torch.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("pose_error_summary: confidences must be finite, >= 0 and not all 0")
    out = {
        "n": float(err.numel()),
        "MAnE": float(err.mean()),
        "wMAnE": float((weights * err).sum() / weights.sum()),
        # torch.median returns the lower middle value; the usual median averages the two.
        "median_angular_error": float(np.median(err.numpy())),
    }
    for t in accuracy_thresholds_deg:
        out[f"acc_{t:g}deg"] = float((err <= t).double().mean())
    return out


def shift_errors(true_shifts_angst, pred_shifts_angst) -> torch.Tensor:
    """Per-particle Euclidean distance between true and predicted in-plane origins.

    Args:
        true_shifts_angst, pred_shifts_angst: ``(N, 2)`` (rlnOriginXAngst, rlnOriginYAngst) in Å.

    Returns:
        ``(N,)`` float64 distances in Å.
    """
    a = torch.as_tensor(true_shifts_angst, dtype=torch.float64)
    b = torch.as_tensor(pred_shifts_angst, dtype=torch.float64)
    if a.shape != b.shape or a.shape[-1] != 2:
        raise ValueError(
            f"shift_errors: expected two (N, 2) arrays of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    return torch.linalg.vector_norm(a - b, dim=-1)


# ---------------------------------------------------------------------------------------------
# Maps
# ---------------------------------------------------------------------------------------------


def _as_map(volume) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(volume))
    if not t.is_floating_point():
        t = t.to(torch.float32)
    return t


def _check_pair(a: torch.Tensor, b: torch.Tensor, caller: str) -> None:
    if a.shape != b.shape or a.ndim != 3 or len(set(a.shape)) != 1:
        raise ValueError(f"{caller} expects two cubic maps of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def pearson_correlation(map1, map2, mask=None) -> float:
    """Real-space Pearson correlation coefficient (paper eq. 7), optionally of the masked maps.

    With a mask, the maps are multiplied by it and correlated over the whole box (the convention of
    masked FSC, and of the CESPED evaluator); without, every voxel counts once. Accumulates in
    float64 chunk by chunk, so large float32 maps are never copied whole.

    Args:
        map1, map2: arrays or tensors of one shape (any number of dimensions).
        mask: same shape, values in [0, 1]; ``None`` means the whole box.

    Returns:
        The correlation, or NaN when a map (masked, with a mask) is constant, zero or not finite.
    """
    a = _as_map(map1)
    b = _as_map(map2)
    if a.shape != b.shape:
        raise ValueError(f"pearson_correlation: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    m = None
    if mask is not None:
        m = _as_map(mask)
        if m.shape != a.shape:
            raise ValueError(
                f"pearson_correlation: mask shape {tuple(m.shape)} differs from the maps' {tuple(a.shape)}"
            )
        m = m.reshape(-1)
    a, b = a.reshape(-1), b.reshape(-1)
    # One pass of raw moments in float64; map values are O(1), so the cancellation in
    # (Σab − ΣaΣb/n) is harmless at float64.
    sums = torch.zeros(5, dtype=torch.float64)
    # Extremes of each map, unmasked and masked, to tell a constant map exactly: its variance from
    # the moments is a rounding residue, not reliably 0. A constant map stays undefined under a
    # mask (as in compare_maps): the masked map would be the mask's shape, not signal.
    low = torch.full((4,), math.inf, dtype=torch.float64)
    high = torch.full((4,), -math.inf, dtype=torch.float64)
    for start in range(0, a.numel(), _CHUNK):
        x0 = x = a[start : start + _CHUNK].double()
        y0 = y = b[start : start + _CHUNK].double()
        if m is not None:
            mm = m[start : start + _CHUNK].double()
            x, y = x * mm, y * mm
        sums += torch.stack([x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()])
        low = torch.minimum(low, torch.stack([x0.min(), y0.min(), x.min(), y.min()]))
        high = torch.maximum(high, torch.stack([x0.max(), y0.max(), x.max(), y.max()]))
    if not (torch.isfinite(sums).all() and bool((high > low).all())):
        return float("nan")  # a constant (or zero) map correlates with nothing; NaN voxels neither
    n = a.numel()
    sx, sy, sxx, syy, sxy = sums.tolist()
    return _correlation(sxy - sx * sy / n, sxx - sx * sx / n, syy - sy * sy / n)


def _correlation(cov: float, var_x: float, var_y: float) -> float:
    if not var_x > 0 or not var_y > 0:  # also NaN: a constant map correlates with nothing
        return float("nan")
    return float(cov / math.sqrt(var_x * var_y))


def map_degeneracy(volume) -> str | None:
    """Why ``volume`` cannot be compared with another map, or ``None`` when it can.

    ``"has NaN or infinite values"``, ``"is zero"`` (every voxel 0) or ``"is constant"`` (one value
    everywhere: no signal beyond the mean). Decided in real space, exactly: a constant map's
    Fourier transform is not exactly 0 off the origin for box sizes that are not powers of 2, so
    its FSC would be a ratio of rounding errors.
    """
    t = _as_map(volume)
    if t.numel() == 0:
        return "is empty"
    if not bool(torch.isfinite(t).all()):
        return "has NaN or infinite values"
    low, high = float(t.min()), float(t.max())
    if low == high:
        return "is zero" if low == 0 else "is constant"
    return None


def _shell_sums(a: torch.Tensor, b: torch.Tensor, binning: str = "round") -> torch.Tensor:
    """``(3, D//2 + 2)`` float64 sums of Re(A·B*), |A|², |B|² per Fourier shell of two ``(D, D, D)``
    maps, over the full Fourier space; the last column gathers the corners beyond Nyquist.

    ``binning``: ``"round"`` (cryopose, RELION: shell k holds the radii in [k − ½, k + ½)) or
    ``"floor"`` (the CESPED package's ``getMaskCorrectedFSC``: radii in [k, k + 1))."""
    if binning not in ("round", "floor"):
        raise ValueError(f"_shell_sums: binning must be 'round' or 'floor', got {binning!r}")
    d = a.shape[0]
    nyquist = d // 2
    fa = torch.fft.rfftn(a)
    fb = torch.fft.rfftn(b)
    real_dtype = fa.real.dtype
    kz = torch.fft.fftfreq(d, d=1.0 / d, dtype=real_dtype)
    kx = torch.fft.rfftfreq(d, d=1.0 / d, dtype=real_dtype)
    ky2 = kz[None, :, None] ** 2
    kx2 = kx[None, None, :] ** 2
    # The real FFT stores half the space: Friedel pairs count twice, the self-conjugate planes once.
    weight = torch.full((kx.numel(),), 2.0, dtype=torch.float64)
    weight[0] = 1.0
    if d % 2 == 0:
        weight[-1] = 1.0
    sums = torch.zeros(3, nyquist + 2, dtype=torch.float64)
    for z0 in range(0, d, _SLAB):
        sa, sb = fa[z0 : z0 + _SLAB], fb[z0 : z0 + _SLAB]
        radius2 = kz[z0 : z0 + _SLAB, None, None] ** 2 + ky2 + kx2  # integers, exact
        if binning == "round":
            shell = torch.round(torch.sqrt(radius2)).to(torch.int64).clamp_(max=nyquist + 1).reshape(-1)
        else:  # the floor of the root of an integer is exact in float64
            shell = torch.floor(torch.sqrt(radius2.double())).to(torch.int64).clamp_(max=nyquist + 1).reshape(-1)
        w = weight.expand(sa.shape).reshape(-1)
        for i, value in enumerate(((sa * sb.conj()).real, sa.real**2 + sa.imag**2, sb.real**2 + sb.imag**2)):
            sums[i] += torch.bincount(shell, weights=value.reshape(-1).double() * w, minlength=nyquist + 2)
    return sums


def _prepare_pair(map1, map2, pixel_size: float, mask, caller: str) -> tuple[torch.Tensor, torch.Tensor]:
    a = _as_map(map1)
    b = _as_map(map2)
    _check_pair(a, b, caller)
    if not pixel_size > 0:
        raise ValueError(f"{caller}: pixel size must be > 0, got {pixel_size}")
    if mask is not None:
        m = _as_map(mask)
        if m.shape != a.shape:
            raise ValueError(f"{caller}: mask shape {tuple(m.shape)} differs from the maps' {tuple(a.shape)}")
        a, b = a * m, b * m
    return a, b


def _fsc_from_sums(sums: torch.Tensor) -> np.ndarray:
    cross, power_a, power_b = sums[:, :-1]
    denom = torch.sqrt(power_a * power_b)
    # A shell where a map has no power has no correlation (0/0): NaN, not 0, which would read as
    # "the maps disagree here" and give the box size as resolution for a zero map. NaN sums (a map
    # with NaN voxels) fail the test too.
    return torch.where(denom > 0, cross / denom.clamp(min=1e-300), torch.full_like(cross, math.nan)).numpy()


def _pcc_from_sums(sums: torch.Tensor) -> float:
    # Parseval: real-space (co)variances are the Fourier sums without the DC term (shell 0).
    cross, power_a, power_b = sums[:, 1:].sum(dim=1).tolist()
    return _correlation(cross, power_a, power_b)


def _shell_frequencies(d: int, pixel_size: float) -> np.ndarray:
    return np.arange(d // 2 + 1, dtype=np.float64) / (d * pixel_size)


def fsc_curve(map1, map2, pixel_size: float, mask=None) -> tuple[np.ndarray, np.ndarray]:
    """Fourier shell correlation between two cubic maps (paper eq. 8).

    Shell ``k`` holds the Fourier voxels whose radius, in units of ``1/(D·pixel_size)``, rounds to
    ``k`` (RELION's binning); shells run from 0 (the mean) to ``D//2`` (Nyquist); the corners beyond
    Nyquist are left out. Each map is transformed once with a real FFT, in its own precision; the
    sums equal those over the full Fourier space and accumulate in float64. Memory beyond the two
    transforms is a slab of 16 planes.

    Args:
        map1, map2: ``(D, D, D)``.
        pixel_size: Å per voxel.
        mask: optional ``(D, D, D)`` real-space mask multiplied into both maps first (masked FSC).

    Returns:
        ``(frequencies, fsc)``: float64 arrays of shape ``(D//2 + 1,)``, shell frequencies in 1/Å and
        the FSC per shell: NaN where a map has no power in the shell (0/0), and at every shell
        beyond 0 when a map (masked, with a mask) is zero, constant or not finite
        (:func:`map_degeneracy`).
    """
    a, b = _prepare_pair(map1, map2, pixel_size, mask, "fsc_curve")
    fsc = _fsc_from_sums(_shell_sums(a, b))
    if map_degeneracy(a) or map_degeneracy(b):
        fsc[1:] = np.nan  # only rounding residue beyond the mean
    return _shell_frequencies(a.shape[0], pixel_size), fsc


def fsc_resolution(frequencies, fsc, threshold: float, low_resolution_angstrom: float = 30.0) -> float:
    """The resolution (Å) at which an FSC curve falls below ``threshold``.

    Definition, on the shells of :func:`fsc_curve` (``k = 0 .. D//2``, frequency ``f_k``):

    1. Shell 0 (the maps' means) is ignored.
    2. The *low-frequency region* is the shells coarser than ``low_resolution_angstrom``
       (``f_k < 1/low_resolution_angstrom``), always including shell 1. A dip below the threshold
       inside it (masking, solvent or ice effects) is not a crossing if the curve is back at or above
       the threshold later in the region: the search starts at the last shell ``s`` of the region
       where ``FSC ≥ threshold``.
    3. The crossing is the first shell ``k > s`` with ``FSC_k < threshold``; the resolution is
       ``1/f`` where ``f`` interpolates linearly *in frequency* between ``f_{k-1}`` and ``f_k`` the
       point where the curve meets the threshold.
    4. No crossing up to Nyquist: the resolution is Nyquist, ``1/f_{D//2}``, i.e. at least this good
       (it never wraps round to another shell).
    5. Below the threshold at every shell of the region (the maps do not even agree at low
       resolution): the resolution is the box size ``1/f_1``, the coarsest measurable.
    6. Undefined shells (NaN: a map without power there, or a degenerate map, see
       :func:`fsc_curve`): if one lies in the low-frequency region, or between the start and the
       crossing, where the curve crosses is unknown and the resolution is NaN, never the box size.
       Undefined shells after the crossing do not matter.

    Args:
        frequencies: ``(K,)`` shell frequencies in 1/Å, increasing, ``frequencies[0] == 0``.
        fsc: ``(K,)`` FSC values.
        threshold: e.g. 0.143 or 0.5.
        low_resolution_angstrom: the low-frequency region's limit in Å.

    Returns:
        The resolution in Å (a Python float), or NaN when undefined (rule 6).
    """
    f = np.asarray(frequencies, dtype=np.float64)
    c = np.asarray(fsc, dtype=np.float64)
    if f.ndim != 1 or f.shape != c.shape or f.size < 2:
        raise ValueError(
            f"fsc_resolution: need matching 1-D frequency and FSC arrays of >= 2 shells, got {f.shape} and {c.shape}"
        )
    if not np.all(np.diff(f) > 0) or f[0] != 0:
        raise ValueError("fsc_resolution: frequencies must start at 0 and increase")
    if np.isinf(c[1:]).any():
        raise ValueError("fsc_resolution: the FSC curve has infinite values")
    undefined = np.isnan(c)
    region = np.flatnonzero(f[1:] < 1.0 / low_resolution_angstrom) + 1
    region = np.union1d(region, [1])
    if undefined[region].any():
        return math.nan
    above = region[c[region] >= threshold]
    if above.size == 0:
        return float(1.0 / f[1])
    start = int(above.max())
    # The first shell after the start that is below the threshold or undefined: an undefined one
    # comes before any crossing, so where the curve would cross is unknown.
    stop = np.flatnonzero((c[start + 1 :] < threshold) | undefined[start + 1 :])
    if stop.size == 0:
        return float(1.0 / f[-1])
    k = start + 1 + int(stop[0])
    if undefined[k]:
        return math.nan
    fraction = (c[k - 1] - threshold) / (c[k - 1] - c[k])
    return float(1.0 / (f[k - 1] + fraction * (f[k] - f[k - 1])))


def cesped_fsc_resolution(frequencies, fsc, threshold: float) -> float:
    """The resolution (Å) at which an FSC curve first falls below ``threshold``: the CESPED
    package's rule (``cesped.utils.fsc.determine_fsc_resolution``, version 25.12.0), reproduced
    as it is for cryopose's CESPED-compatible mode.

    CESPED takes the *first* shell ``k`` (shell 0, the maps' means, included) with
    ``FSC_k < threshold`` (NaN shells never count as below), interpolates linearly in frequency
    between ``f_{k-1}`` and ``f_k``, and reports ``1/f``; with no such shell, Nyquist ``1/f_{-1}``.
    When shell 0 is the first below (maps whose means have opposite signs), its ``k − 1`` is the
    last shell, as numpy indexing makes it in CESPED's code.

    cryopose's own :func:`fsc_resolution` differs on purpose: it skips a dip below the threshold
    in the low-frequency region when the curve comes back above it there (masking, solvent and ice
    effects), so a curve dipping at 40 Å and crossing for good at 8 Å reads 8 Å, not ~40 Å; and
    it returns NaN rather than a number when an undefined (0/0) shell comes before the crossing.

    Args:
        frequencies: ``(K,)`` shell frequencies in 1/Å (``frequencies[0] == 0``).
        fsc: ``(K,)`` FSC values.
        threshold: e.g. 0.143 or 0.5.

    Returns:
        The resolution in Å (a Python float; NaN only where CESPED's arithmetic gives NaN).
    """
    f = np.asarray(frequencies, dtype=np.float64)
    c = np.asarray(fsc, dtype=np.float64)
    if f.ndim != 1 or f.shape != c.shape or f.size < 2:
        raise ValueError(
            f"cesped_fsc_resolution: need matching 1-D frequency and FSC arrays of >= 2 shells, got {f.shape} "
            f"and {c.shape}"
        )
    below = np.flatnonzero(c < threshold)
    if below.size == 0:
        return float(1.0 / f[-1])
    k = int(below[0])
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = f[k - 1] + (f[k] - f[k - 1]) * (threshold - c[k - 1]) / (c[k] - c[k - 1])
        return float(1.0 / inv)


@dataclass
class MapComparison:
    """Two maps compared: PCC, FSC curve and FSC resolutions, unmasked and (when a mask is given)
    masked. ``resolution[t]`` and ``masked_resolution[t]`` are in Å for each threshold ``t``.

    Undefined values are NaN; ``reasons`` maps each of their names (``"PCC"``, ``"FSCR0.143"``,
    ``"masked_PCC"``, ...) to why, e.g. ``"V1 is zero"``."""

    pcc: float
    frequencies: np.ndarray
    fsc: np.ndarray
    resolution: dict[float, float]
    masked_pcc: float | None = None
    masked_fsc: np.ndarray | None = None
    masked_resolution: dict[float, float] | None = None
    reasons: dict[str, str] = field(default_factory=dict)

    def as_dict(self, pair: str = "") -> dict[str, float]:
        """Flat ``{name: float}``: ``PCC<pair>``, ``FSCR0.143<pair>``, ``FSCR0.5<pair>`` and their
        ``masked_`` twins, e.g. ``as_dict("(GT,V)")["FSCR0.5(GT,V)"]``; NaN where undefined."""
        out = {f"PCC{pair}": self.pcc}
        out.update({f"FSCR{t:g}{pair}": r for t, r in self.resolution.items()})
        if self.masked_pcc is not None:
            out[f"masked_PCC{pair}"] = self.masked_pcc
            out.update({f"masked_FSCR{t:g}{pair}": r for t, r in self.masked_resolution.items()})
        return out

    def null_reasons(self, pair: str = "") -> dict[str, str]:
        """``{name: reason}`` for the NaN values of :meth:`as_dict` (same names)."""
        return {f"{key}{pair}": reason for key, reason in self.reasons.items()}


def _compare_variant(
    a: torch.Tensor,
    b: torch.Tensor,
    freqs: np.ndarray,
    thresholds: tuple[float, ...],
    low_resolution_angstrom: float,
    problems: list[str],
    prefix: str,
    reasons: dict[str, str],
    cesped_compatible: bool = False,
) -> tuple[float, np.ndarray, dict[float, float]]:
    """PCC, FSC and resolutions of one variant (unmasked or masked), recording in ``reasons``
    (under ``prefix + name``) why any of them is NaN; ``problems``: the maps' degeneracies."""
    sums = _shell_sums(a, b, "floor" if cesped_compatible else "round")
    fsc = _fsc_from_sums(sums)
    if problems:
        # Nothing to compare: every value is undefined for the same reason. The FFT of a constant
        # map leaves rounding residue off the origin, which must not pass for a curve.
        fsc[1:] = np.nan
        reason = "; ".join(problems)
        reasons[f"{prefix}PCC"] = reason
        reasons.update({f"{prefix}FSCR{t:g}": reason for t in thresholds})
        return math.nan, fsc, {t: math.nan for t in thresholds}
    pcc = _pcc_from_sums(sums)
    if math.isnan(pcc):
        reasons[f"{prefix}PCC"] = "a map has no variance"
    resolution = {}
    for t in thresholds:
        if cesped_compatible:
            resolution[t] = cesped_fsc_resolution(freqs, fsc, t)
        else:
            resolution[t] = fsc_resolution(freqs, fsc, t, low_resolution_angstrom)
        if math.isnan(resolution[t]):
            shells = np.flatnonzero(np.isnan(fsc[1:])) + 1
            reasons[f"{prefix}FSCR{t:g}"] = (
                f"the FSC is undefined (a map has no power) at shell {int(shells[0])}, before it crosses {t:g}"
            )
    return pcc, fsc, resolution


def compare_maps(
    map1,
    map2,
    pixel_size: float,
    mask=None,
    thresholds: tuple[float, ...] = FSC_THRESHOLDS,
    low_resolution_angstrom: float = 30.0,
    names: tuple[str, str] = ("map1", "map2"),
    cesped_compatible: bool = False,
) -> MapComparison:
    """PCC, FSC and FSC resolutions of two cubic maps, over the whole box and, if ``mask`` is given,
    of the maps multiplied by the mask.

    ``cesped_compatible``: the CESPED package's FSC instead of cryopose's: shells binned by the
    floor of the radius (``_shell_sums``), resolutions by its first-crossing rule
    (:func:`cesped_fsc_resolution`; ``low_resolution_angstrom`` is then unused). The PCCs are the
    same in both modes.

    One Fourier pass per variant: the PCC comes from the same shell sums as the FSC (Parseval), so
    two 232³ maps cost two real FFTs each, unmasked or masked.

    A map that is zero, constant or not finite (:func:`map_degeneracy`) makes every value NaN,
    masked ones included; a map that is only zero inside the mask makes the masked values NaN.
    ``names`` name the maps in the reasons (``result.reasons``), e.g. ``"V1 is zero"``.
    """
    a, b = _prepare_pair(map1, map2, pixel_size, None, "compare_maps")
    freqs = _shell_frequencies(a.shape[0], pixel_size)
    problems = [f"{n} {p}" for n, x in zip(names, (a, b)) if (p := map_degeneracy(x))]
    reasons: dict[str, str] = {}
    pcc, fsc, resolution = _compare_variant(
        a, b, freqs, thresholds, low_resolution_angstrom, problems, "", reasons, cesped_compatible
    )
    result = MapComparison(pcc=pcc, frequencies=freqs, fsc=fsc, resolution=resolution, reasons=reasons)
    if mask is not None:
        ma, mb = _prepare_pair(a, b, pixel_size, mask, "compare_maps")
        # A degenerate map stays the reason (a constant map times a soft mask is the mask's shape,
        # not signal); otherwise a map may still be empty where the mask is.
        masked_problems = problems or [
            f"{n} {p} inside the mask" for n, x in zip(names, (ma, mb)) if (p := map_degeneracy(x))
        ]
        result.masked_pcc, result.masked_fsc, result.masked_resolution = _compare_variant(
            ma, mb, freqs, thresholds, low_resolution_angstrom, masked_problems, "masked_", reasons, cesped_compatible
        )
    return result
