"""Supervised training of a grid-classifier pose network (Image2Sphere) on one half of an entry.

The loss is the paper's eq. 11: cross-entropy against a target that spreads ``1/|G|`` over the
grid cells of the symmetry mates ``g·R`` (:func:`cryopose.grids.symmetric_grid_target`), each
particle weighted by its ground-truth confidence (rlnMaxValueProbDistribution), averaged over the
batch. RAdam, learning rate halved when the validation loss stalls, early stopping, gradient
clipping, bfloat16 autocast of the encoder on a GPU.

Reproducibility and interruptions: every random draw of an epoch (shuffling, augmentation, the
projector's point subsets) comes from generators seeded by ``(seed, epoch)``, and a checkpoint is
written (atomically) after every epoch, so a run killed at any moment and resumed from its last
checkpoint ends with the same weights as an uninterrupted run (bit-exact on a CPU).

Files in ``work_dir``: ``checkpoint.pt`` (last epoch: weights, optimiser, scheduler, counters);
in ``out_dir``: ``model.pt`` (best validation loss), ``train_log.csv``, ``training.png``.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ... import io
from ...augment import AugmentConfig
from ...data import ParticlesDataset
from ...device import report_device, select_device
from ...grids import grid_quaternions_of, symmetric_grid_cells
from ...symmetry import symmetry_aware_angle
from .network import Image2Sphere, Image2SphereConfig
from .prediction import bf16_autocast

__all__ = [
    "TrainConfig",
    "train_image2sphere",
    "load_model",
    "LOG_COLUMNS",
    "epoch_generator",
    "train_val_split",
    "weighted_loss",
    "validation_pass",
]

LOG_COLUMNS = ["epoch", "train_loss", "val_loss", "val_median_error_deg", "val_mean_error_deg", "lr", "seconds"]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings (the paper's Appendix B values where it gives them).

    ``max_epochs``: 400 in the paper. ``lr_patience``: epochs of stalled validation loss before the
    learning rate is halved (paper: 10). ``early_stop_patience``: epochs without improvement before
    stopping (paper: 12). ``max_minutes``: optional wall-time budget, checked after each epoch (a
    budget makes the number of epochs machine-dependent; leave it unset for reproducible runs).
    """

    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-5
    max_epochs: int = 400
    lr_patience: int = 10
    early_stop_patience: int = 12
    grad_clip: float = 5.0
    val_fraction: float = 0.1
    augment: bool = True
    seed: int = 0
    max_minutes: float | None = None
    device: str = "auto"
    #: "plateau": halve the rate after ``lr_patience`` epochs of stalled validation loss (the
    #: paper's); "onecycle": warm up to ``lr`` over the first 10 % of the ``max_epochs`` budget,
    #: then anneal to ~0 by its end (for a fixed, short budget, where a plateau rarely comes).
    lr_schedule: str = "plateau"

    def __post_init__(self):
        if self.lr_schedule not in ("plateau", "onecycle"):
            raise ValueError(f"lr_schedule must be 'plateau' or 'onecycle', got {self.lr_schedule!r}")
        if self.batch_size < 1 or self.max_epochs < 1:
            raise ValueError("batch_size and max_epochs must be >= 1")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


def epoch_generator(seed: int, epoch: int, stream: int) -> torch.Generator:
    """The generator of one random stream of one epoch: a resumed run draws what an uninterrupted
    one would."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) * 7919 + stream)


def train_val_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(train, validation)`` particle indices of a half, sorted, the same for a seed."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    n_val = max(1, int(round(n * val_fraction)))
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def weighted_loss(logits: torch.Tensor, cells: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Paper eq. 11: ``mean_i( −conf_i Σ_c P_ic log Q_ic )``, the target ``P`` given by its cells.

    ``P_i`` is ``1/|G|`` on the cell of each symmetry mate (:func:`cryopose.grids.symmetric_grid_target`,
    mates in one cell adding up), so ``Σ_c P_ic log Q_ic = mean_g log Q_i,cells[i, g]``: a gather of
    ``|G|`` values per item instead of a dense ``(B, 72·8^order)`` target (the same loss and
    gradient to float rounding). ``cells``: ``(B, |G|)`` from :func:`cryopose.grids.symmetric_grid_cells`.
    """
    log_q = torch.log_softmax(logits.float(), dim=-1)
    per_item = -log_q.gather(1, cells.to(log_q.device)).mean(-1)
    return (weight.reshape(-1) * per_item).mean()


def _state_without_constants(model: torch.nn.Module) -> dict:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def load_model(path: str | Path, device: torch.device | str = "cpu") -> tuple[Image2Sphere, dict]:
    """A trained model from ``model.pt`` (weights + architecture) and its record."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model weights not found: {path}")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    model = Image2Sphere(Image2SphereConfig.from_dict(saved["model_config"]))
    model.load_state_dict(saved["state_dict"])
    return model.to(device).eval(), saved


def _save(path: Path, obj: dict) -> None:
    with io.atomic_write(path) as tmp:
        torch.save(obj, tmp)


def _write_log(path: Path, rows: list[dict]) -> None:
    with io.atomic_write(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=LOG_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)


@torch.no_grad()
def validation_pass(
    model: Image2Sphere,
    dataset: ParticlesDataset,
    indices: np.ndarray,
    batch_size: int,
    device: torch.device,
    cells: dict[int, torch.Tensor],
) -> tuple[float, np.ndarray]:
    """Validation loss and errors; ``cells`` keeps each batch's target cells across epochs (the
    validation set is fixed and not augmented, so they are computed once)."""
    model.eval()
    grid = model.grid.to(device)
    grid_q = None
    losses, errors = [], []
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        _, images, (rot, _, conf), _ = dataset.get_batch(idx)
        with bf16_autocast(device):
            signal = model.signal(images.to(device))
        logits = model.grid_logits(signal.float())
        if start not in cells:
            if grid_q is None:
                grid_q = grid_quaternions_of(model.grid.cpu())
            cells[start] = symmetric_grid_cells(rot, model.grid.cpu(), dataset.symmetry, grid_quaternions=grid_q)
        losses.append(float(weighted_loss(logits, cells[start], conf.to(device))) * len(idx))
        pred = grid[logits.argmax(-1)].cpu()
        # The benchmark's error (paper eq. 5), computed here without importing the judge.
        errors.append(
            symmetry_aware_angle(
                torch.as_tensor(rot, dtype=torch.float64), torch.as_tensor(pred, dtype=torch.float64), dataset.symmetry
            ).numpy()
        )
    return sum(losses) / len(indices), np.concatenate(errors)


def train_image2sphere(
    entry,
    half: int,
    out_dir: str | Path,
    model_config: Image2SphereConfig,
    config: TrainConfig = TrainConfig(),
    work_dir: str | Path | None = None,
    progress: bool = True,
    benchmark_dir=None,
) -> list[dict]:
    """Train on half ``half`` of ``entry``; resume from ``work_dir/checkpoint.pt`` when it exists.

    Args:
        entry: entry name, folder or :class:`~cryopose.Entry` (usually the preprocessed copy).
        half: 0 or 1.
        out_dir: receives ``model.pt`` (best validation loss) and ``train_log.csv``.
        model_config: the architecture; its ``image_size`` sets the dataset's image size.
        config: optimisation settings.
        work_dir: where the per-epoch checkpoint lives (default ``out_dir``). Keep it outside a
            folder that a workflow manager deletes on failure, so a rerun can resume.

    Returns:
        The log rows (one dict per epoch, :data:`LOG_COLUMNS`).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir is not None else out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    device = select_device(config.device)
    report_device("image2sphere training", device)
    torch.manual_seed(config.seed)

    data_kw = dict(image_size=model_config.image_size, benchmark_dir=benchmark_dir)
    train_set = ParticlesDataset(entry, half, augment=AugmentConfig() if config.augment else None, **data_kw)
    val_set = ParticlesDataset(entry, half, **data_kw)
    train_idx, val_idx = train_val_split(len(train_set), config.val_fraction, config.seed)
    if len(train_idx) < config.batch_size:
        raise ValueError(
            f"{train_set.star_path}: {len(train_idx)} training particles are fewer than one batch ({config.batch_size})"
        )

    model = Image2Sphere(model_config).to(device)
    # foreach: one multi-tensor kernel per update term instead of a loop over the 64 parameters (3× faster
    # on a CPU, where torch's default is the loop; the same update to float rounding).
    optimiser = torch.optim.RAdam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    n_batches = len(train_idx) // config.batch_size  # drop the last partial batch
    if config.lr_schedule == "onecycle":  # stepped after each batch
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimiser, max_lr=config.lr, total_steps=config.max_epochs * n_batches, pct_start=0.1
        )
    else:  # stepped after each epoch, on the validation loss
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimiser, mode="min", factor=0.5, patience=config.lr_patience
        )
    grid_cpu = model.grid.cpu()
    grid_q = grid_quaternions_of(grid_cpu)  # once: the lookup of each batch's target cells reuses it
    rows: list[dict] = []
    best, bad_epochs, start_epoch = math.inf, 0, 0
    # What determines the trajectory; the epoch budget and the device may change between runs.
    # (A one-cycle schedule's budget is its shape: there, max_epochs determines the trajectory.)
    free = ("max_minutes", "device") + (() if config.lr_schedule == "onecycle" else ("max_epochs",))
    trajectory = {k: v for k, v in asdict(config).items() if k not in free}
    fingerprint = {
        "model_config": model_config.to_dict(),
        "train_config": trajectory,
        "entry": str(getattr(train_set.entry, "name", entry)),
        "half": int(half),
    }

    checkpoint_path = work_dir / "checkpoint.pt"
    if checkpoint_path.is_file():
        ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        if ckpt.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{checkpoint_path}: a checkpoint of another configuration or entry; delete it to start afresh"
            )
        model.load_state_dict(ckpt["state_dict"])
        optimiser.load_state_dict(ckpt["optimiser"])
        scheduler.load_state_dict(ckpt["scheduler"])
        rows, best, bad_epochs, start_epoch = ckpt["rows"], ckpt["best"], ckpt["bad_epochs"], ckpt["epoch"] + 1
        print(f"resuming from {checkpoint_path} after epoch {ckpt['epoch'] + 1}", flush=True)
    stopped = bool(rows) and (bad_epochs >= config.early_stop_patience)

    started = time.monotonic() - sum(r["seconds"] for r in rows)
    val_cells: dict[int, torch.Tensor] = {}
    for epoch in range(start_epoch, config.max_epochs):
        if stopped:
            break
        t0 = time.monotonic()
        model.train()
        order = train_idx[torch.randperm(len(train_idx), generator=epoch_generator(config.seed, epoch, 1)).numpy()]
        train_set.generator = epoch_generator(config.seed, epoch, 2)
        projector_gen = epoch_generator(config.seed, epoch, 3)
        total = 0.0
        bar = tqdm(
            range(n_batches),
            desc=f"epoch {epoch + 1}/{config.max_epochs}",
            unit="batch",
            disable=not progress,
            leave=False,
        )
        for b in bar:
            idx = order[b * config.batch_size : (b + 1) * config.batch_size]
            _, images, (rot, _, conf), _ = train_set.get_batch(idx)
            cells = symmetric_grid_cells(rot, grid_cpu, train_set.symmetry, grid_quaternions=grid_q).to(device)
            with bf16_autocast(device):
                signal = model.signal(images.to(device), projector_gen)
            loss = weighted_loss(model.grid_logits(signal.float()), cells, conf.to(device))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimiser.step()
            if config.lr_schedule == "onecycle":
                scheduler.step()
            total += float(loss.detach())
            bar.set_postfix(
                loss=f"{total / (b + 1):.3f}", val_median=f"{rows[-1]['val_median_error_deg']:.1f}°" if rows else "-"
            )
        bar.close()
        val_loss, val_err = validation_pass(model, val_set, val_idx, config.batch_size, device, val_cells)
        if config.lr_schedule == "plateau":
            scheduler.step(val_loss)
        row = {
            "epoch": epoch + 1,
            "train_loss": total / n_batches,
            "val_loss": val_loss,
            "val_median_error_deg": float(np.median(val_err)),
            "val_mean_error_deg": float(val_err.mean()),
            "lr": optimiser.param_groups[0]["lr"],
            "seconds": time.monotonic() - t0,
        }
        rows.append(row)
        if val_loss < best:
            best, bad_epochs = val_loss, 0
            _save(
                out_dir / "model.pt",
                {
                    "model_config": model_config.to_dict(),
                    "state_dict": _state_without_constants(model),
                    "epoch": epoch + 1,
                    "val_loss": val_loss,
                    "val_median_error_deg": row["val_median_error_deg"],
                },
            )
        else:
            bad_epochs += 1
        stopped = bad_epochs >= config.early_stop_patience
        budget = config.max_minutes is not None and time.monotonic() - started > 60 * config.max_minutes
        _save(
            checkpoint_path,
            {
                "fingerprint": fingerprint,
                "state_dict": _state_without_constants(model),
                "optimiser": optimiser.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rows": rows,
                "best": best,
                "bad_epochs": bad_epochs,
                "epoch": epoch,
            },
        )
        _write_log(out_dir / "train_log.csv", rows)
        print(
            f"epoch {epoch + 1}: train loss {row['train_loss']:.4f}, val loss {val_loss:.4f}, val median error "
            f"{row['val_median_error_deg']:.1f}°, lr {row['lr']:.2g}, {row['seconds']:.0f} s"
            + (" (early stop)" if stopped else ""),
            flush=True,
        )
        if budget:
            print(f"time budget of {config.max_minutes} min reached", flush=True)
            break
    if not (out_dir / "model.pt").is_file():
        raise RuntimeError("training ended without a model (no epoch finished)")
    _write_log(out_dir / "train_log.csv", rows)
    plot_training(rows, out_dir / "training.png", f"{fingerprint['entry']} half {half}: Image2Sphere training")
    return rows


def plot_training(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Training and validation loss (left axis) and validation median angular error (right axis)
    per epoch, from the rows of ``train_log.csv``."""
    epochs = [r["epoch"] for r in rows]
    import matplotlib

    matplotlib.use("Agg")  # headless: a cluster node has no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(epochs, [r["train_loss"] for r in rows], "o-", color="C0", label="train loss")
    ax.plot(epochs, [r["val_loss"] for r in rows], "s-", color="C1", label="validation loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("weighted cross-entropy (eq. 11)")
    right = ax.twinx()
    right.plot(epochs, [r["val_median_error_deg"] for r in rows], "^--", color="C2", label="validation median error")
    right.set_ylabel("validation median angular error (°)")
    right.set_ylim(0, 180)
    lines = ax.get_lines() + right.get_lines()
    ax.legend(lines, [line.get_label() for line in lines], fontsize=8, loc="upper right")
    ax.set_title(title or "training")
    with io.atomic_write(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
