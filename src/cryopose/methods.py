"""The methods registry: what the workflow trains and cross-predicts.

A method is a name plus a ``train`` and a ``predict`` step with one contract:

* ``train(entry, half, model_dir, params)`` learns from half ``half`` of the entry and writes
  whatever it needs into ``model_dir`` (always a ``model.json`` that says what was trained on what);
* ``predict(model_dir, entry, half, out_star, params)`` writes the predictions STAR for half
  ``half``, which must be the *other* half than the model's.

The oracle rows ship here: ``ground_truth`` (predicts the true poses: its ΔPCC and ΔFSCR
calibrate zero) and ``random`` (uniform random rotations: the floor). Learned methods register
themselves the same way and the workflow needs no change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import io
from .errors import InputError
from .geometry import matrix_to_euler, random_rotations

__all__ = ["Method", "METHODS", "get_method", "parse_params", "read_model_record", "write_model_record"]

EULER = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]


@dataclass(frozen=True)
class Method:
    """A pose-estimation method as the benchmark sees it."""

    name: str
    description: str
    prediction_type: str  # "S2", "SO3" or "SO3xR2": what evaluate() takes from the predictions
    train: Callable[[io.Entry, int, Path, dict], None]
    predict: Callable[[Path, io.Entry, int, Path, dict], None]
    default_params: dict
    #: Train and predict on the workflow's preprocessed copy of the entry (normalised,
    #: CTF-corrected, resized: ``cryopose preprocess``) rather than on the raw particles.
    needs_preprocessing: bool = False


def write_model_record(model_dir: Path, method: str, entry: io.Entry, half: int, params: dict,
                       extra: dict | None = None) -> None:
    """``model_dir/model.json``: the method, the entry and half it was trained on, its parameters."""
    record = {"method": method, "entry": entry.name, "trained_on_half": int(half),
              "n_particles": entry.n_particles(half), "params": params, **(extra or {})}
    model_dir.mkdir(parents=True, exist_ok=True)
    with io.atomic_write(model_dir / "model.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def read_model_record(model_dir: Path, method: str, entry: io.Entry, half: int) -> dict:
    """Read ``model.json`` and check that it is ``method``'s model of ``entry``, trained on the
    other half than ``half`` (cross-prediction: never predict the half a model saw)."""
    path = Path(model_dir) / "model.json"
    if not path.is_file():
        raise InputError("model record not found (was the method's train step run?)", path=path)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"not valid JSON ({err})", path=path) from err
    for key, expected in (("method", method), ("entry", entry.name)):
        if record.get(key) != expected:
            raise InputError(f"model is for {key} {record.get(key)!r}, not {expected!r}", path=path, where=key)
    if record.get("trained_on_half") != 1 - half:
        raise InputError(f"a model trained on half {record.get('trained_on_half')} cannot predict half {half}: "
                         f"predictions must come from the model of the other half", path=path,
                         where="trained_on_half")
    return record


def _predictions_from_truth(entry: io.Entry, half: int, out_star: Path, rotmats: torch.Tensor | None) -> None:
    star = entry.read_star(half)
    parts = star.particles.copy()
    if rotmats is not None:
        parts[EULER] = matrix_to_euler(rotmats.double()).numpy()
    parts["rlnParticleFigureOfMerit"] = 1.0
    io.write_particles_star(out_star, io.ParticleStar(star.optics.copy(), parts))


def _train_oracle(name: str):
    def train(entry: io.Entry, half: int, model_dir: Path, params: dict) -> None:
        write_model_record(Path(model_dir), name, entry, half, params)
    return train


def _predict_ground_truth(model_dir: Path, entry: io.Entry, half: int, out_star: Path, params: dict) -> None:
    read_model_record(model_dir, "ground_truth", entry, half)
    _predictions_from_truth(entry, half, Path(out_star), None)


def _predict_random(model_dir: Path, entry: io.Entry, half: int, out_star: Path, params: dict) -> None:
    read_model_record(model_dir, "random", entry, half)
    seed = int(params.get("seed", 0))
    # A seed per (entry, half) so that the two halves are independent draws.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + half * 7919 + sum(map(ord, entry.name)))
    _predictions_from_truth(entry, half, Path(out_star), random_rotations(entry.n_particles(half), generator=gen))


METHODS: dict[str, Method] = {
    "ground_truth": Method("ground_truth", "oracle: predicts the refined poses (calibrates ΔPCC and ΔFSCR to 0)",
                           "SO3", _train_oracle("ground_truth"), _predict_ground_truth, {}),
    "random": Method("random", "floor: uniformly random rotations, true shifts", "SO3", _train_oracle("random"),
                     _predict_random, {"seed": 0}),
}


def get_method(name: str) -> Method:
    """The registered method ``name``; :class:`InputError` listing the known ones otherwise."""
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))}", where="method")
    return METHODS[name]


def parse_params(pairs: list[str] | None, defaults: dict) -> dict:
    """``["seed=3", "lr=1e-3"]`` → ``{"seed": 3, "lr": 0.001}`` over ``defaults`` (values parsed as
    JSON when they can be, else kept as strings); unknown keys are an error."""
    params = dict(defaults)
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InputError(f"parameter {pair!r} is not of the form key=value", where="--param")
        if key not in defaults:
            raise InputError(f"unknown parameter {key!r}; this method takes: {', '.join(sorted(defaults)) or 'none'}",
                             where="--param")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params

