"""Where torch work runs: a CUDA GPU when one is visible, else the CPU; and how a log says so.

Every stage that computes with torch (training, prediction, projection matching, refinement,
reconstruction) picks its device here, so ``auto`` means the same everywhere and each stage's log
names the device it used (issue 21: the GPU when there is one, and saying so).
"""

from __future__ import annotations

import torch

__all__ = ["select_device", "describe_device", "report_device"]


def select_device(name: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` or ``None``: the first CUDA GPU when there is one, else the CPU; otherwise the
    named device (``"cpu"``, ``"cuda"``, ``"cuda:1"``)."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def describe_device(device: torch.device | str) -> str:
    """``"cuda:0 (NVIDIA H100 80GB HBM3)"`` or ``"cpu (2 torch threads)"``."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return f"{device.type} ({torch.get_num_threads()} torch threads)"


def report_device(stage: str, device: torch.device | str) -> None:
    """One log line: which device ``stage`` runs on."""
    print(f"{stage}: on {describe_device(device)}", flush=True)
