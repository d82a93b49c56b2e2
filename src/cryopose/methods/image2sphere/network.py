"""Image2Sphere (Klee et al., ICLR 2023) as the CESPED paper adapts it to cryo-EM (Appendix B).

Pipeline for a batch of images ``(B, 1, S, S)``:

1. the image and two Gaussian-filtered copies (σ = 1, 2 px) make the 3 channels a torchvision
   ResNet expects; the ResNet without its pooling head gives a feature map ``(B, C, h, w)``;
2. a 1×1 convolution reduces C; the map is projected orthographically onto the HEALPix pixels of
   the hemisphere facing the viewer (image x = column, y = row, z = viewing direction) and
   expanded in real spherical harmonics up to ``lmax`` — in training over a random subset of the
   points, in evaluation over all of them (deterministic);
3. an S² convolution with global support (a kernel on a HEALPix grid of the whole sphere) lifts the
   signal to SO(3); a pointwise ReLU on an SO(3) grid (e3nn's ``SO3Activation``); an SO(3)
   convolution with local support (kernel near the identity) gives one SO(3) signal;
4. the signal is evaluated on the SO(3) HEALPix grid of :mod:`cryopose.grids`: logits over
   ``72·8^order`` rotations.

Conventions. Rotations here are this package's R (RELION's ZYZ matrix, :mod:`cryopose.geometry`).
Rotating the image by φ in-plane turns the pose R into ``R·Rz(−φ)`` (:mod:`cryopose.augment`) and
the hemisphere's spherical-harmonic coefficients into ``D(Rz(φ))·c``. e3nn's ``o3.Linear`` acts on
the multiplicity index and the rotation acts on the other, so in e3nn's flattened Wigner layout
(``f(g) = Σ c[u, m]·D(g)[u, m]``) the SO(3) signal turns into ``f(g·Rz(φ))``: the logit of pose R
is ``f(R)``, and the labels and the network's built-in equivariance agree. e3nn's Wigner matrices
are built from e3nn's own Y-X-Y angles of R (``o3.matrix_to_angles``), never from RELION's Euler
angles. ``tests/methods/test_image2sphere.py`` checks this end to end (an exact 90° turn of the feature
map permutes the logits as the labels say).

Wigner matrices, spherical harmonics and e3nn's activation grids are slow to build on a CPU
(seconds to minutes): they are computed once per configuration and cached on disk (see
:func:`cache_dir`), and kept out of checkpoints (non-persistent buffers).
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ... import io
from ...grids import so3_healpix_grid

__all__ = ["Image2SphereConfig", "Image2Sphere", "cache_dir", "wigner_table", "RESNETS", "e3nn_so3_activation"]

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


@dataclass(frozen=True)
class Image2SphereConfig:
    """Architecture of :class:`Image2Sphere`. Defaults are the CPU-sized model of the synthetic suite;
    :meth:`paper` gives the CESPED paper's Appendix B configuration.

    Attributes:
        image_size: side of the (square) input images in pixels.
        resnet: torchvision ResNet name (``resnet18`` … ``resnet152``).
        encoder_weights: a local torchvision ResNet state-dict file (e.g. ImageNet weights); ``None``
            for random initialisation (weights cannot be downloaded by this package).
        drop_maxpool: remove the ResNet stem's max-pool, doubling the feature map's side (useful for
            small images: 64 px gives 4×4 instead of 2×2).
        gaussian_sigmas: σ in pixels of the two filtered copies that make channels 2 and 3.
        sphere_channels: channels after the 1×1 convolution (the paper: 512).
        projector_order: HEALPix order of the hemisphere grid (order 3 ≈ 7.3°).
        projector_fraction: fraction of hemisphere points drawn at random in each training step.
        lmax: highest spherical-harmonic degree.
        s2_channels: output channels of the S² convolution (hidden SO(3) features).
        s2_kernel_order: HEALPix order of the S² kernel grid (global support).
        activation_resolution: resolution of e3nn's SO(3) grid for the pointwise activation.
        so3_kernel_max_beta: local support of the SO(3) kernel (radians).
        so3_kernel_n_alpha, so3_kernel_n_beta: kernel grid sampling.
        output_order: order of the SO(3) HEALPix output grid (``72·8^order`` rotations).
    """

    image_size: int = 64
    resnet: str = "resnet18"
    encoder_weights: str | None = None
    drop_maxpool: bool = True
    gaussian_sigmas: tuple[float, float] = (1.0, 2.0)
    sphere_channels: int = 256
    projector_order: int = 2
    projector_fraction: float = 0.5
    lmax: int = 6
    s2_channels: int = 16
    s2_kernel_order: int = 2
    activation_resolution: int = 6
    so3_kernel_max_beta: float = math.pi / 8
    so3_kernel_n_alpha: int = 8
    so3_kernel_n_beta: int = 3
    output_order: int = 3

    def __post_init__(self):
        object.__setattr__(self, "gaussian_sigmas", tuple(float(s) for s in self.gaussian_sigmas))
        if self.resnet not in RESNETS:
            raise ValueError(f"resnet must be one of {', '.join(RESNETS)}, got {self.resnet!r}")
        if not 0 < self.projector_fraction <= 1:
            raise ValueError(f"projector_fraction must be in (0, 1], got {self.projector_fraction}")
        if len(self.gaussian_sigmas) != 2:
            raise ValueError(f"gaussian_sigmas needs two values (channels 2 and 3), got {self.gaussian_sigmas}")
        for name in (
            "image_size",
            "sphere_channels",
            "lmax",
            "s2_channels",
            "activation_resolution",
            "so3_kernel_n_alpha",
            "so3_kernel_n_beta",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("projector_order", "s2_kernel_order", "output_order"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def paper(cls, **overrides) -> Image2SphereConfig:
        """The CESPED paper's Appendix B model (ResNet152 at 256 px, lmax 8, output order 4)."""
        base = dict(
            image_size=256,
            resnet="resnet152",
            drop_maxpool=False,
            sphere_channels=512,
            projector_order=3,
            lmax=8,
            s2_channels=16,
            s2_kernel_order=3,
            activation_resolution=10,
            output_order=4,
        )
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["gaussian_sigmas"] = list(self.gaussian_sigmas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Image2SphereConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown Image2Sphere setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)


# --------------------------------------------------------------------------- cached constants
def cache_dir() -> Path:
    """Where slow-to-build constants are cached: ``$CRYOPOSE_CACHE`` or ``~/.cache/cryopose``."""
    return Path(os.environ.get("CRYOPOSE_CACHE") or Path.home() / ".cache" / "cryopose")


def _cached(name: str, build):
    """``build()`` once per ``name`` (which must encode every input and the library versions)."""
    import e3nn

    key = hashlib.sha1(f"{name}|e3nn {e3nn.__version__}|torch {torch.__version__}".encode()).hexdigest()[:16]
    path = cache_dir() / f"{name.split('|')[0]}-{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, weights_only=False)
        except Exception:  # a cache file cut short by a crash: rebuild it
            pass
    value = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with io.atomic_write(path) as tmp:
            torch.save(value, tmp)
    except OSError:  # a read-only home is no reason to fail: just do not cache
        pass
    return value


def _e3nn_angles(rotmats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from e3nn import o3

    return o3.matrix_to_angles(rotmats.double())


def wigner_table(lmax: int, rotmats: torch.Tensor) -> torch.Tensor:
    """``(N, Σ(2l+1)²)`` flattened, √(2l+1)-scaled real Wigner-D matrices of ``rotmats`` (N, 3, 3),
    e3nn's basis and layout (``e3nn.o3._so3grid.flat_wigner``), computed in float64, returned float32."""
    from e3nn.o3._so3grid import flat_wigner

    alpha, beta, gamma = _e3nn_angles(rotmats)
    out = [
        flat_wigner(lmax, alpha[i : i + 4096], beta[i : i + 4096], gamma[i : i + 4096]).float()
        for i in range(0, len(alpha), 4096)
    ]
    return torch.cat(out) if out else torch.zeros(0, sum((2 * l + 1) ** 2 for l in range(lmax + 1)))


def _output_wigner(lmax: int, order: int) -> torch.Tensor:
    """Wigner rows of every rotation of the output grid."""
    return _cached(
        f"output_wigner|lmax={lmax}|order={order}|R", lambda: wigner_table(lmax, so3_healpix_grid(order, torch.float64))
    )


def _sphere_harmonics(lmax: int, xyz: torch.Tensor) -> torch.Tensor:
    from e3nn import o3

    return o3.spherical_harmonics(list(range(lmax + 1)), xyz.float(), normalize=True, normalization="component")


def _healpix_xyz(order: int) -> torch.Tensor:
    import healpy as hp

    nside = 2**order
    return torch.tensor(np.stack(hp.pix2vec(nside, np.arange(hp.nside2npix(nside)), nest=True), -1))


def e3nn_so3_activation(lmax: int, resolution: int) -> nn.Module:
    """e3nn's own SO(3) activation (cached): the reference :class:`SeparableSO3Activation` is
    checked against, in the tests and the training benchmark."""

    def build():
        from e3nn.nn import SO3Activation

        return SO3Activation(lmax, lmax, torch.relu, resolution)

    act = _cached(f"so3_activation|lmax={lmax}|resolution={resolution}", build)
    for grid in (act.grid_in, act.grid_out):  # constants: keep them out of state dicts and checkpoints
        for name in list(grid._buffers):
            value = grid._buffers.pop(name)
            grid.register_buffer(name, value, persistent=False)
    return act


def _separable_activation_tables(lmax: int, resolution: int) -> dict:
    """Tables of :class:`SeparableSO3Activation` (float64 maths, float32 tables).

    e3nn's SO(3) grid is ``(α, β, γ)`` with ``na = 4·resolution`` equally spaced α = γ and
    ``nb = 2·resolution`` β. A Wigner matrix of degree l ≤ lmax depends on α and γ only through
    ``cos(kα), sin(kα), cos(k'γ), sin(k'γ)`` with ``k, k' ≤ l``, so the grid table factors exactly as
    ``D[α, β, γ, i] = Σ_kk' E[α, k]·M[β, k, k', i]·E[γ, k']`` with ``E`` the real Fourier basis
    ``(na, 2·lmax+1)``, and ``M`` is block-sparse: coefficient i (degree l, row frequency p, column
    frequency q) reaches only the basis pairs of frequencies (p, q) — about 1 % of its entries.
    """
    from e3nn.o3 import s2_grid
    from e3nn.o3._so3grid import _quadrature_weights, flat_wigner

    nb, na = 2 * resolution, 4 * resolution
    beta, alpha = s2_grid(nb, na, dtype=torch.float64)
    table = flat_wigner(lmax, alpha[:, None, None], beta[None, :, None], alpha[None, None, :])  # (α, β, γ, i)
    qw = _quadrature_weights(nb // 2, dtype=torch.float64) * nb**2 / na**2
    n, nk = table.shape[-1], 2 * lmax + 1
    freq = torch.tensor([(k + 1) // 2 for k in range(nk)])
    basis = torch.stack(
        [torch.ones_like(alpha)] + [f(k * alpha) for k in range(1, lmax + 1) for f in (torch.cos, torch.sin)], -1
    )  # (na, nk)
    inv = torch.linalg.pinv(basis)
    m = torch.einsum("ka,abci,jc->bkji", inv, table, inv)  # (β, k, k', i)
    recon = torch.einsum("ak,bkji,cj->abci", basis, m, basis)
    if float((recon - table).abs().max()) > 1e-4:  # e3nn's own tables carry ~1e-5 of float32 rounding
        raise RuntimeError("the SO(3) grid's Wigner table is not band-limited in α and γ as expected")
    # The (p, q) frequency block of each coefficient: where its energy lies; the rest is rounding.
    energy = m.square().sum(0)  # (k, k', i)
    pair_energy = torch.zeros(lmax + 1, lmax + 1, n, dtype=torch.float64)
    pair_energy.index_put_((freq[:, None].expand(nk, nk), freq[None, :].expand(nk, nk)), energy, accumulate=True)
    flat = pair_energy.reshape(-1, n)
    block_of_input = flat.argmax(0)  # (n,) index p·(lmax+1) + q
    outside = flat.sum(0) - flat.max(0).values
    if float((outside / flat.sum(0)).max()) > 1e-6:
        raise RuntimeError("the SO(3) grid's Wigner table does not split into frequency blocks as expected")
    out_pair = (freq[:, None] * (lmax + 1) + freq[None, :]).expand(nb, nk, nk).reshape(-1)  # (nb·nk·nk,)
    m_flat = m.reshape(-1, n)  # (nb·nk·nk, n)
    m_flat = torch.where(out_pair[:, None] == block_of_input[None, :], m_flat, 0.0)  # exact zeros off the blocks
    qw_out = qw.repeat_interleave(nk * nk)[:, None]  # quadrature weight of each (β, k, k') row
    return {
        "basis": basis.float(),
        "to_fourier": (m_flat / n**0.5).float(),
        "from_fourier": (m_flat * qw_out * n**0.5).T.float().contiguous(),
        "shape": (nb, nk),
    }


class SeparableSO3Activation(nn.Module):
    """e3nn's ``SO3Activation`` (the signal on e3nn's SO(3) grid, a pointwise activation, back to
    coefficients with e3nn's quadrature), computed through the factorisation of
    :func:`_separable_activation_tables`: coefficients → per-β Fourier coefficients in (α, γ) by a
    block-sparse product, → grid by two small real Fourier syntheses; and the adjoint back. The same
    function as e3nn's dense ``(…, 455) × (455, 6,912)`` products (lmax 6, resolution 6) to float
    rounding, with ~10× fewer operations. ``act`` is e3nn's normalised activation (``normalize2mom``).
    """

    def __init__(self, lmax: int, resolution: int, act: nn.Module):
        super().__init__()
        t = _cached(
            f"separable_activation|lmax={lmax}|resolution={resolution}|v3",
            lambda: _separable_activation_tables(lmax, resolution),
        )
        self.act = act
        self.nb, self.nk = t["shape"]
        self.register_buffer("basis", t["basis"], persistent=False)
        # The sparse maps are kept as their CSR parts (plain tensors: a sparse buffer would break
        # deepcopy and some device moves) and assembled in forward, which costs microseconds.
        for name in ("to_fourier", "from_fourier"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                csr = t[name].to_sparse_csr()
            self.register_buffer(f"{name}_rows", csr.crow_indices(), persistent=False)
            self.register_buffer(f"{name}_cols", csr.col_indices(), persistent=False)
            self.register_buffer(f"{name}_values", csr.values(), persistent=False)
        self.shapes = {"to_fourier": tuple(t["to_fourier"].shape), "from_fourier": tuple(t["from_fourier"].shape)}
        self.register_buffer("basis_t", t["basis"].T.contiguous(), persistent=False)

    def _sparse(self, name: str) -> torch.Tensor:
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is not
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                getattr(self, f"{name}_rows"),
                getattr(self, f"{name}_cols"),
                getattr(self, f"{name}_values"),
                self.shapes[name],
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, n = x.shape[:-1], x.shape[-1]
        # Rows last throughout, so that every product below is a plain (batched) matrix product.
        x = x.reshape(-1, n).float().T.contiguous()  # (n, rows)
        rows, nb, nk, na = x.shape[1], self.nb, self.nk, self.basis.shape[0]
        coeff = torch.sparse.mm(self._sparse("to_fourier"), x).view(nb * nk, nk, rows)  # (β·k, k', rows)
        grid = torch.matmul(self.basis, coeff).view(nb, nk, na * rows)  # (β, k, γ·rows)
        grid = self.act(torch.matmul(self.basis, grid))  # (β, α, γ·rows)
        coeff = torch.matmul(self.basis_t, grid).view(nb * nk, na, rows)  # (β·k, γ, rows)
        coeff = torch.matmul(self.basis_t, coeff).view(nb * nk * nk, rows)  # (β·k·k', rows)
        return torch.sparse.mm(self._sparse("from_fourier"), coeff).T.reshape(*lead, n)


def _s2_irreps(lmax: int):
    from e3nn import o3

    return o3.Irreps([(1, (l, 1)) for l in range(lmax + 1)])


def _so3_irreps(lmax: int):
    from e3nn import o3

    return o3.Irreps([(2 * l + 1, (l, 1)) for l in range(lmax + 1)])


def near_identity_kernel(max_beta: float, n_alpha: int, n_beta: int) -> torch.Tensor:
    """``(n_alpha·n_beta·n_alpha, 3, 3)`` kernel rotations of the local SO(3) convolution: e3nn
    angles α over the circle, β in (0, max_beta], γ = −α + c with c over the circle (any in-plane
    turn, tilted by at most ``max_beta``)."""
    from e3nn import o3

    a = torch.arange(n_alpha, dtype=torch.float64) * 2 * math.pi / n_alpha
    b = torch.arange(1, n_beta + 1, dtype=torch.float64) * max_beta / n_beta
    c = torch.arange(n_alpha, dtype=torch.float64) * 2 * math.pi / n_alpha
    A, B, C = torch.meshgrid(a, b, c, indexing="ij")
    return o3.angles_to_matrix(A.flatten(), B.flatten(), (C - A).flatten())


# --------------------------------------------------------------------------- layers
class GaussianChannels(nn.Module):
    """``(B, 1, S, S)`` → ``(B, 3, S, S)``: the image and two Gaussian-filtered copies."""

    def __init__(self, sigmas: tuple[float, float]):
        super().__init__()
        self.sigmas = sigmas

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.functional import gaussian_blur

        blurred = [gaussian_blur(x, kernel_size=2 * math.ceil(3 * s) + 1, sigma=s) for s in self.sigmas]
        return torch.cat([x, *blurred], dim=1)


def resnet_encoder(name: str, weights_path: str | None = None, drop_maxpool: bool = False) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its average pool and classifier, and its output channels."""
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if weights_path:
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(f"encoder weights file not found: {path}")
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = net.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"fc.weight", "fc.bias"}:
            raise ValueError(
                f"{path}: not a torchvision {name} state dict (missing {sorted(missing)[:3]}…, "
                f"unexpected {sorted(unexpected)[:3]}…)"
            )
    channels = net.fc.in_features
    layers = (
        [net.conv1, net.bn1, net.relu]
        + ([] if drop_maxpool else [net.maxpool])
        + [net.layer1, net.layer2, net.layer3, net.layer4]
    )
    return nn.Sequential(*layers), channels


class HemisphereProjector(nn.Module):
    """Feature map ``(B, C, h, w)`` → spherical-harmonic coefficients ``(B, C, Σ(2l+1))``.

    Orthographic projection: the hemisphere point (x, y, z > 0) reads the feature map at image
    position (x, y) ∈ [−1, 1]² (bilinear). Coefficients are the mean of ``feature · Y_lm`` over the
    points used: all of them in evaluation, a random ``fraction`` in training.
    """

    def __init__(self, order: int, lmax: int, fraction: float):
        super().__init__()
        xyz = _healpix_xyz(order)
        xyz = xyz[xyz[:, 2] > 0]
        self.fraction = fraction
        self.register_buffer("grid_xy", xyz[:, :2].float().view(1, 1, -1, 2), persistent=False)
        self.register_buffer("harmonics", _sphere_harmonics(lmax, xyz), persistent=False)

    def forward(self, features: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        grid, harmonics = self.grid_xy, self.harmonics
        if self.training and self.fraction < 1:
            n = grid.shape[2]
            keep = torch.randperm(n, generator=generator, device="cpu")[: max(1, round(n * self.fraction))]
            keep = keep.to(grid.device)
            grid, harmonics = grid[:, :, keep], harmonics[keep]
        grid = grid.expand(features.shape[0], -1, -1, -1).to(features.dtype)
        sampled = F.grid_sample(features, grid, mode="bilinear", align_corners=False)[:, :, 0]  # (B, C, P)
        return torch.einsum("bcp,pi->bci", sampled, harmonics.to(sampled.dtype)) / harmonics.shape[0]


class GroupConvolution(nn.Module):
    """Group convolution with a learned kernel, S² → SO(3) or SO(3) → SO(3).

    The kernel is a weighted sum of basis functions (spherical harmonics or Wigner D) sampled at
    ``n`` kernel points, ``kernel_table (n, dim)``; e3nn's Linear applies it in the harmonic domain.
    """

    def __init__(self, kernel_table: torch.Tensor, irreps_in, irreps_out, f_in: int, f_out: int):
        super().__init__()
        from e3nn import o3

        self.register_buffer("kernel_table", kernel_table, persistent=False)  # rebuilt, never saved
        self.weight = nn.Parameter(torch.randn(f_in, f_out, kernel_table.shape[0]))
        self.linear = o3.Linear(irreps_in, irreps_out, f_in=f_in, f_out=f_out, internal_weights=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        psi = torch.einsum("ni,xyn->xyi", self.kernel_table, self.weight) / self.kernel_table.shape[0] ** 0.5
        return self.linear(x, weight=psi)


def s2_convolution(f_in: int, f_out: int, lmax: int, kernel_order: int) -> GroupConvolution:
    """S² → SO(3), the kernel of global support sampled at the HEALPix points of ``kernel_order``."""
    kernel = _sphere_harmonics(lmax, _healpix_xyz(kernel_order))
    return GroupConvolution(kernel, _s2_irreps(lmax), _so3_irreps(lmax), f_in, f_out)


def so3_convolution(f_in: int, f_out: int, lmax: int, kernel_rotmats: torch.Tensor) -> GroupConvolution:
    """SO(3) → SO(3), the kernel of local support sampled at ``kernel_rotmats`` (near the identity)."""
    key = hashlib.sha1(kernel_rotmats.double().numpy().tobytes()).hexdigest()[:12]
    kernel = _cached(f"kernel_wigner|lmax={lmax}|{key}", lambda: wigner_table(lmax, kernel_rotmats))
    return GroupConvolution(kernel, _so3_irreps(lmax), _so3_irreps(lmax), f_in, f_out)


class Image2Sphere(nn.Module):
    """Images ``(B, 1, S, S)`` → logits ``(B, 72·8^order)`` over :func:`cryopose.grids.so3_healpix_grid`.

    ``signal(images)`` gives the SO(3) signal's coefficients ``(B, Σ(2l+1)²)``, and
    ``logits_at(signal, rotmats)`` evaluates it at any poses (for refinement off the grid).
    """

    def __init__(self, config: Image2SphereConfig = Image2SphereConfig()):
        super().__init__()
        self.config = c = config
        self.channels = GaussianChannels(c.gaussian_sigmas)
        self.encoder, enc_channels = resnet_encoder(c.resnet, c.encoder_weights, c.drop_maxpool)
        self.reduce = nn.Conv2d(enc_channels, c.sphere_channels, kernel_size=1)
        self.projector = HemisphereProjector(c.projector_order, c.lmax, c.projector_fraction)
        self.s2_conv = s2_convolution(c.sphere_channels, c.s2_channels, c.lmax, c.s2_kernel_order)
        # e3nn's SO3Activation, evaluated separably (same function, ~10× fewer operations); e3nn's
        # module supplies the normalised activation (its constant is cached with it).
        self.activation = SeparableSO3Activation(
            c.lmax, c.activation_resolution, e3nn_so3_activation(c.lmax, c.activation_resolution).act
        )
        kernel = near_identity_kernel(c.so3_kernel_max_beta, c.so3_kernel_n_alpha, c.so3_kernel_n_beta)
        self.so3_conv = so3_convolution(c.s2_channels, 1, c.lmax, kernel)
        self.register_buffer("output_wigner", _output_wigner(c.lmax, c.output_order), persistent=False)
        self.register_buffer("grid", so3_healpix_grid(c.output_order), persistent=False)

    def signal(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``(B, 1, S, S)`` → ``(B, Σ(2l+1)²)`` coefficients of the output SO(3) signal."""
        if images.ndim != 4 or images.shape[1] != 1:
            raise ValueError(f"images must be (B, 1, S, S), got {tuple(images.shape)}")
        x = self.reduce(self.encoder(self.channels(images)))
        with torch.autocast(device_type=x.device.type, enabled=False):  # the equivariant head stays float32
            return self.head(self.projector(x.float(), generator))

    def head(self, sphere: torch.Tensor) -> torch.Tensor:
        """The equivariant part: S² coefficients ``(B, C, Σ(2l+1))`` → SO(3) coefficients."""
        x = self.s2_conv(sphere)
        x = self.activation(x)
        return self.so3_conv(x)[:, 0]

    def grid_logits(self, signal: torch.Tensor) -> torch.Tensor:
        """``(B, Σ(2l+1)²)`` → ``(B, G)`` logits on the output grid."""
        return signal @ self.output_wigner.to(signal.dtype).T

    def logits_at(self, signal: torch.Tensor, rotmats: torch.Tensor) -> torch.Tensor:
        """Logits of poses ``rotmats`` ``(B, K, 3, 3)`` for each item: ``(B, K)``."""
        b, k = rotmats.shape[:2]
        table = wigner_table(self.config.lmax, rotmats.reshape(-1, 3, 3).cpu())
        table = table.to(signal.device, signal.dtype).reshape(b, k, -1)
        return torch.einsum("bi,bki->bk", signal, table)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.grid_logits(self.signal(images, generator))
