"""The methods registry: what the workflow trains and cross-predicts.

A method is a name plus a ``train`` and a ``predict`` step with one contract:

* ``train(entry, half, model_dir, params, work_dir)`` learns from half ``half`` of the entry and
  writes whatever it needs into ``model_dir`` (always a ``model.json`` that says what was trained on
  what); ``work_dir`` (or ``None``) holds state worth keeping across an interrupted run (checkpoints);
* ``predict(model_dir, entry, half, out_star, params, transfer=False)`` writes the predictions
  STAR for half ``half``, which must be the *other* half than the model's; with ``transfer``, the
  model is of another entry (the generalisation experiment) and any half may be predicted.

The oracle rows ship here: ``ground_truth`` (predicts the true poses: its ΔPCC and ΔFSCR
calibrate zero) and ``random`` (uniform random rotations: the floor); and the paper's baseline
``image2sphere`` (:mod:`cryopose.models.image2sphere`, :mod:`cryopose.train`,
:mod:`cryopose.predict`), whose heavy imports wait until it is used; the classical anchor
``projection_matching`` (:mod:`cryopose.matching`); and, for any of them, ``<method>+refine``:
its poses refined locally against the training half's map.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from . import io
from .errors import InputError
from .geometry import matrix_to_euler, random_rotations
from .matching import MatchingConfig
from .relion_refine import RelionRefineConfig

__all__ = ["Method", "METHODS", "check_params", "get_method", "parse_params", "read_model_record", "write_model_record"]

EULER = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]


@dataclass(frozen=True)
class Method:
    """A pose-estimation method as the benchmark sees it."""

    name: str
    description: str
    prediction_type: str  # "S2", "SO3" or "SO3xR2": what evaluate() takes from the predictions
    train: Callable[[io.Entry, int, Path, dict, Path | None], None]
    predict: Callable[..., None]  # (model_dir, entry, half, out_star, params, transfer=False)
    default_params: dict
    #: Train and predict on the workflow's preprocessed copy of the entry (normalised,
    #: CTF-corrected, resized: ``cryopose preprocess``) rather than on the raw particles.
    needs_preprocessing: bool = False
    #: Runs on a GPU when one is lent (the workflow then asks the cluster for one).
    uses_gpu: bool = False
    #: Builds from the full parameters the settings objects train and predict build (raising
    #: InputError on an impossible value), so the workflow can judge them before any job.
    settings: Callable[[dict], object] | None = None


def write_model_record(model_dir: Path, method: str, entry: io.Entry, half: int, params: dict,
                       extra: dict | None = None) -> None:
    """``model_dir/model.json``: the method, the entry and half it was trained on, its parameters."""
    record = {"method": method, "entry": entry.name, "trained_on_half": int(half),
              "n_particles": entry.n_particles(half), "params": params, **(extra or {})}
    model_dir.mkdir(parents=True, exist_ok=True)
    with io.atomic_write(model_dir / "model.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")


def read_model_record(model_dir: Path, method: str, entry: io.Entry, half: int, transfer: bool = False) -> dict:
    """Read ``model.json`` and check that it is ``method``'s model of ``entry``, trained on the
    other half than ``half`` (cross-prediction: never predict the half a model saw); with
    ``transfer``, that it is a model of *another* entry (the generalisation experiment)."""
    path = Path(model_dir) / "model.json"
    if not path.is_file():
        raise InputError("model record not found (was the method's train step run?)", path=path)
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"not valid JSON ({err})", path=path) from err
    if record.get("method") != method:
        raise InputError(f"model is for method {record.get('method')!r}, not {method!r}", path=path, where="method")
    if transfer:
        if record.get("entry") == entry.name:
            raise InputError(f"a transfer predicts another entry than the model's, and this model was trained on "
                             f"{entry.name!r}", path=path, where="entry")
        return record
    if record.get("entry") != entry.name:
        raise InputError(f"model is for entry {record.get('entry')!r}, not {entry.name!r}", path=path, where="entry")
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
    def train(entry: io.Entry, half: int, model_dir: Path, params: dict, work_dir: Path | None = None) -> None:
        write_model_record(Path(model_dir), name, entry, half, params)
    return train


def _predict_ground_truth(model_dir: Path, entry: io.Entry, half: int, out_star: Path, params: dict,
                          transfer: bool = False) -> None:
    read_model_record(model_dir, "ground_truth", entry, half, transfer)
    _predictions_from_truth(entry, half, Path(out_star), None)


def _predict_random(model_dir: Path, entry: io.Entry, half: int, out_star: Path, params: dict,
                    transfer: bool = False) -> None:
    read_model_record(model_dir, "random", entry, half, transfer)
    seed = int(params.get("seed", 0))
    # A seed per (entry, half) so that the two halves are independent draws.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + half * 7919 + sum(map(ord, entry.name)))
    _predictions_from_truth(entry, half, Path(out_star), random_rotations(entry.n_particles(half), generator=gen))


def _image2sphere_settings(params: dict):
    from .models.image2sphere import Image2SphereConfig
    from .train import TrainConfig

    model_keys, train_keys = set(Image2SphereConfig.__dataclass_fields__), set(TrainConfig.__dataclass_fields__)
    try:
        model = Image2SphereConfig(**{k: v for k, v in params.items() if k in model_keys})
        train = TrainConfig(**{k: v for k, v in params.items() if k in train_keys})
    except (TypeError, ValueError) as err:
        raise InputError(f"image2sphere parameters: {err}", where="--param") from err
    return model, train


def _train_image2sphere(entry: io.Entry, half: int, model_dir: Path, params: dict,
                        work_dir: Path | None = None) -> None:
    from .train import train_image2sphere

    model_config, train_config = _image2sphere_settings(params)
    rows = train_image2sphere(entry, half, model_dir, model_config, train_config, work_dir=work_dir)
    best = min(rows, key=lambda r: r["val_loss"])
    write_model_record(Path(model_dir), "image2sphere", entry, half, params,
                       {"epochs": len(rows), "best_epoch": best["epoch"],
                        "val_median_error_deg": best["val_median_error_deg"]})


def _predict_image2sphere(model_dir: Path, entry: io.Entry, half: int, out_star: Path, params: dict,
                          transfer: bool = False) -> None:
    from .data import ParticlesDataset
    from .predict import predict_image2sphere, write_predictions_star
    from .train import load_model, select_device

    read_model_record(model_dir, "image2sphere", entry, half, transfer)
    _, train_config = _image2sphere_settings(params)
    device = select_device(train_config.device)
    model, _ = load_model(Path(model_dir) / "model.pt", device)
    dataset = ParticlesDataset(entry, half, image_size=model.config.image_size)
    rotmats, confidence = predict_image2sphere(model, dataset, batch_size=2 * train_config.batch_size, device=device,
                                               refine_steps=int(params.get("refine_steps", 0)))
    write_predictions_star(dataset, rotmats, confidence, out_star)


def _matching_config(cls, params: dict):
    from .matching import config_from_params

    try:
        return config_from_params(cls, params)
    except (TypeError, ValueError) as err:
        raise InputError(f"{cls.__name__} parameters: {err}", where="--param") from err


def _train_reference(name: str):
    """Training of the reference-based methods: the "model" is the reference, the training half
    reconstructed from its refined poses (``model_dir/reference.mrc``)."""
    def train(entry: io.Entry, half: int, model_dir: Path, params: dict, work_dir: Path | None = None) -> None:
        from .reconstruct import reconstruct_torch

        volume, px = reconstruct_torch(entry.star_path(half), symmetry=entry.symmetry, progress=False)
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        io.write_map(model_dir / "reference.mrc", volume, px)
        write_model_record(model_dir, name, entry, half, params)
    return train


_train_projection_matching = _train_reference("projection_matching")


def _relion_refine_settings(params: dict) -> RelionRefineConfig:
    try:
        return RelionRefineConfig.from_params(params)
    except (TypeError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"relion_refine parameters: {err}", where="--param") from err


def _predict_relion_refine(model_dir: Path, entry: io.Entry, half: int, out_star: Path, params: dict,
                           transfer: bool = False) -> None:
    from .relion_refine import auto_refine_half

    read_model_record(model_dir, "relion_refine", entry, half, transfer)
    seconds = auto_refine_half(entry, half, Path(model_dir) / "reference.mrc", out_star,
                               _relion_refine_settings(params),
                               log_path=Path(out_star).with_suffix(".relion_refine.log"))
    print(f"relion_refine: {seconds:.0f} s", flush=True)


def _predict_projection_matching(model_dir: Path, entry: io.Entry, half: int, out_star: Path, params: dict,
                                 transfer: bool = False) -> None:
    from .matching import MatchingConfig, match_entry

    read_model_record(model_dir, "projection_matching", entry, half, transfer)
    match_entry(entry, half, Path(model_dir) / "reference.mrc", out_star, _matching_config(MatchingConfig, params))


#: Local refinement (:mod:`cryopose.matching`), for the ``<method>+refine`` variants.
REFINE_SUFFIX = "+refine"


def refine_defaults() -> dict:
    from .matching import RefineConfig

    return RefineConfig().to_dict()


def _refined(base: Method) -> Method:
    """``base`` followed by a local refinement of its poses and shifts against the training half's
    map (paper Appendix F). Its model folder holds the base model in ``base/`` and ``reference.mrc``."""
    name = base.name + REFINE_SUFFIX
    refine_keys = set(refine_defaults())

    def split(params: dict) -> tuple[dict, dict]:
        return ({k: v for k, v in params.items() if k not in refine_keys},
                {k: v for k, v in params.items() if k in refine_keys})

    def train(entry, half, model_dir, params, work_dir=None):
        base_params, _ = split(params)
        # A base that asks for a preprocessed copy gets the same images from the raw entry:
        # ParticlesDataset preprocesses on the fly what the copy holds precomputed.
        base.train(entry, half, Path(model_dir) / "base", base_params, work_dir)
        _train_projection_matching(entry, half, Path(model_dir), {}, None)
        write_model_record(Path(model_dir), name, entry, half, params)

    def settings(params):
        from .matching import RefineConfig

        base_params, refine_params = split(params)
        return (base.settings(base_params) if base.settings else None,
                _matching_config(RefineConfig, refine_params))

    def predict(model_dir, entry, half, out_star, params, transfer=False):
        from .matching import RefineConfig, refine_entry

        read_model_record(model_dir, name, entry, half, transfer)
        base_params, refine_params = split(params)
        # The base's predictions are scratch: next to the output, removed on any exit (SIGTERM
        # included) and by the next run after a SIGKILL.
        with io.temporary_folder(Path(out_star).parent, Path(out_star).name) as tmp:
            first = Path(tmp) / "base.star"
            base.predict(Path(model_dir) / "base", entry, half, first, base_params, transfer=transfer)
            refine_entry(entry, half, first, Path(model_dir) / "reference.mrc", out_star,
                         _matching_config(RefineConfig, refine_params))

    return Method(name, f"{base.name}, then local refinement of its poses and shifts against the training "
                  "half's map", "SO3xR2", train, predict, {**base.default_params, **refine_defaults()},
                  needs_preprocessing=False, uses_gpu=True, settings=settings)


#: The CPU-sized default (64 px, ResNet18, lmax 6, output order 3): a few minutes per half on
#: 2 cores. ``config/cesped.yaml`` holds the paper's configuration.
IMAGE2SPHERE_DEFAULTS = {
    "image_size": 64, "resnet": "resnet18", "encoder_weights": None, "drop_maxpool": True, "sphere_channels": 256,
    "projector_order": 2, "projector_fraction": 0.5, "lmax": 6, "s2_channels": 16, "s2_kernel_order": 2,
    "activation_resolution": 6, "output_order": 3, "gaussian_sigmas": [1.0, 2.0],
    "so3_kernel_max_beta": 0.39269908169872414, "so3_kernel_n_alpha": 8, "so3_kernel_n_beta": 3,
    "batch_size": 32, "lr": 1e-3, "weight_decay": 1e-5, "max_epochs": 6, "lr_patience": 2,
    "early_stop_patience": 4, "grad_clip": 5.0, "val_fraction": 0.1, "augment": True, "seed": 0,
    "max_minutes": None, "device": "auto", "refine_steps": 0,
}

METHODS: dict[str, Method] = {
    "ground_truth": Method("ground_truth", "oracle: predicts the refined poses (calibrates ΔPCC and ΔFSCR to 0)",
                           "SO3", _train_oracle("ground_truth"), _predict_ground_truth, {}),
    "random": Method("random", "floor: uniformly random rotations, true shifts", "SO3", _train_oracle("random"),
                     _predict_random, {"seed": 0}),
    "image2sphere": Method("image2sphere", "Image2Sphere (Klee et al. 2023; the CESPED paper's baseline): ResNet → "
                           "hemisphere → S² and SO(3) convolutions → SO(3) grid classifier", "SO3",
                           _train_image2sphere, _predict_image2sphere, IMAGE2SPHERE_DEFAULTS,
                           needs_preprocessing=True, uses_gpu=True, settings=_image2sphere_settings),
    "projection_matching": Method("projection_matching", "classical anchor (paper eq. 1): CTF-modulated projections "
                                  "of the training half's map over an SO(3) grid and shifts, coarse to fine",
                                  "SO3xR2", _train_projection_matching, _predict_projection_matching,
                                  asdict(MatchingConfig()), needs_preprocessing=False, uses_gpu=True,
                                  settings=lambda params: _matching_config(MatchingConfig, params)),
    "relion_refine": Method("relion_refine", "classical pipeline (paper section 1.1, Appendix G): RELION 3D "
                            "auto-refine of the blind test half from the training half's map low-passed to 40 Å",
                            "SO3xR2", _train_reference("relion_refine"), _predict_relion_refine,
                            RelionRefineConfig().to_dict(), settings=_relion_refine_settings),
}


def get_method(name: str) -> Method:
    """The registered method ``name``, or ``<method>+refine`` (that method followed by local
    refinement); :class:`InputError` listing the known ones otherwise."""
    if name.endswith(REFINE_SUFFIX) and name[:-len(REFINE_SUFFIX)] in METHODS:
        return _refined(METHODS[name[:-len(REFINE_SUFFIX)]])
    if name not in METHODS:
        raise InputError(f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))} (and "
                         f"<method>{REFINE_SUFFIX} for any of them)", where="method")
    return METHODS[name]


#: The type of the parameters whose default is null (any other takes its default's type).
NULLABLE_PARAMS = {"encoder_weights": str, "max_minutes": float, "particle_diameter_A": float}


def _expected(key: str, default) -> str:
    kind = NULLABLE_PARAMS.get(key, type(default))
    name = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list: "a list of numbers", tuple: "a list of numbers"}.get(kind, kind.__name__)
    return f"{name} or null" if default is None else name


def _fits(key: str, value, default) -> bool:
    """Whether ``value`` has the type ``default`` (the parameter's default) has."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if default is None:
        if key not in NULLABLE_PARAMS or value is None:
            return True
        default = NULLABLE_PARAMS[key]()
    # bool before int: True is an int in Python but no seed; 2.0 is no integer count.
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return number(value)
    if isinstance(default, str):
        return isinstance(value, str)
    if isinstance(default, (list, tuple)):
        return isinstance(value, (list, tuple)) and all(number(v) for v in value)
    return True


def check_params(name: str, params: dict, where: str = "--param") -> dict:
    """Judge a method's parameters as its jobs will: known keys, each of its default's type
    (``seed: abc`` is no integer), then the settings objects built (ranges). Returns the full
    parameters (defaults overlaid); :class:`InputError` names the key, the value and what was
    expected."""
    method = get_method(name)
    defaults = method.default_params
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise InputError(f"unknown parameter(s) {', '.join(unknown)}; {name} takes: "
                         f"{', '.join(sorted(defaults)) or 'none'}", where=where)
    for key, value in params.items():
        if not _fits(key, value, defaults[key]):
            raise InputError(f"{key} must be {_expected(key, defaults[key])} (default {defaults[key]!r}), "
                             f"got {value!r}", where=where)
    full = {**defaults, **params}
    if method.settings is not None:
        try:
            method.settings(full)
        except InputError as err:  # the builders say "--param"; the caller knows where the values came from
            raise InputError(err.problem, where=where) from err
    return full


def parse_params(pairs: list[str] | None, defaults: dict) -> dict:
    """``["seed=3", "lr=1e-3"]`` → ``{"seed": 3, "lr": 0.001}`` over ``defaults`` (values parsed as
    JSON when they can be, else kept as strings); unknown keys and values of another type than the
    default's are an error naming the key."""
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
        # A string parameter keeps its text even when it reads as JSON (device=0, extra_args=1).
        if isinstance(defaults[key], str) and not isinstance(params[key], str):
            params[key] = value
        if not _fits(key, params[key], defaults[key]):
            raise InputError(f"{key} must be {_expected(key, defaults[key])} (default {defaults[key]!r}), "
                             f"got {params[key]!r}", where=f"--param {key}")
    return params
