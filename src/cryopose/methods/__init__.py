"""The methods registry: every pose estimator the benchmark trains, cross-predicts and ranks.

A method is one folder here, ``cryopose/methods/<name>/``, whose ``__init__.py`` exports ``METHOD``,
a :class:`Method` describing itself: its name and description, the kind of predictions it makes,
its parameters dataclass (the single source of their defaults, types, ranges and docs:
:mod:`cryopose.parameters`), whether it runs on the preprocessed copy of an entry or on a GPU, the
cluster resources of each stage, and two functions with one contract:

* ``train(entry, half, model_dir, params, work_dir) -> dict | None`` learns from half ``half`` of
  the entry and writes whatever it needs into ``model_dir``; ``work_dir`` (or ``None``) holds state
  worth keeping across an interrupted run (checkpoints). It may return facts for the model record.
* ``predict(model_dir, entry, half, out_star, params) -> None`` writes the predictions STAR of half
  ``half`` (:func:`cryopose.predictions.write_predictions`).

The registry wraps both (:meth:`Method.run_train`, :meth:`Method.run_predict`): it writes the
model record ``model_dir/model.json`` (method, entry, half, parameters) and refuses to predict the
half a model saw, or another entry's half except in a transfer (the generalisation experiment).
A method never imports the judge (:mod:`cryopose.evaluate`, :mod:`cryopose.metrics`).

For any method ``m``, ``m+refine`` is ``m`` followed by the local refinement of its poses and
shifts against the training half's map (:mod:`cryopose.refine`, the one refinement: the workflow's
rule runs the same code against the same map).

A folder without ``METHOD`` is refused when the registry loads, naming the folder.

Methods from other packages join the registry through an entry point in the group
``cryopose.methods`` (``name = "package.module:METHOD"`` in the package's pyproject.toml; an
example package is ``examples/cryopose-svd-regressor``). A plugin that cannot be loaded, is not a
:class:`Method`, has another name than its entry point or takes a built-in's name is left out and
reported by name with its error (:data:`PLUGIN_ERRORS`, a :class:`PluginWarning`; asking for it
raises that error), and every other method still runs.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import json
import pkgutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import io, parameters
from ..entry import Entry
from ..errors import InputError
from ..predictions import PREDICTION_TYPES

__all__ = [
    "Method",
    "Resources",
    "METHODS",
    "PLUGIN_ERRORS",
    "PluginWarning",
    "method_origin",
    "REFINE_SUFFIX",
    "get_method",
    "check_params",
    "parse_params",
    "read_model_record",
    "write_model_record",
    "method_table",
]


@dataclass(frozen=True)
class Resources:
    """What one stage of a method asks of a cluster node (the workflow's ``threads`` and
    ``resources``). ``threads=None`` takes the config's ``threads.train``; ``gpus`` is how many
    GPUs the stage can use (the workflow lends ``devices.train_gpus`` when it is > 0)."""

    threads: int | None = None
    mem_mb: int = 8000
    runtime_min: int = 120
    gpus: int = 0


def default_resources(method: Method, params) -> dict[str, Resources]:
    """A day to train, two hours to predict, 8 GB each; GPUs when the method uses one."""
    gpus = 1 if method.uses_gpu else 0
    return {
        "train": Resources(mem_mb=8000, runtime_min=24 * 60, gpus=gpus),
        "predict": Resources(mem_mb=8000, runtime_min=120, gpus=gpus),
    }


@dataclass(frozen=True)
class Method:
    """A pose-estimation method as the benchmark sees it (module docstring)."""

    name: str
    description: str
    #: What :func:`cryopose.evaluate.evaluate` reads from the predictions: "S2", "SO3" or "SO3xR2".
    prediction_type: str
    #: The parameters dataclass (fields made with :func:`cryopose.parameters.param`).
    params: type
    train: Callable[..., dict | None]
    predict: Callable[..., None]
    #: Train and predict on the workflow's preprocessed copy of the entry (normalised,
    #: CTF-corrected, resized: ``cryopose preprocess``) rather than on the raw particles.
    needs_preprocessing: bool = False
    #: Runs on a GPU when one is lent (the workflow then asks the cluster for one).
    uses_gpu: bool = False
    #: ``resources(method, params) -> {"train": Resources, "predict": Resources}``.
    resources: Callable[[Method, object], dict[str, Resources]] = default_resources
    #: For a method whose prediction type is one of its parameters (``command``): ``params -> type``.
    prediction_type_of: Callable[[object], str] | None = None
    #: What a run needs beyond valid parameters (the defaults need not be runnable, e.g. the
    #: ``command`` method's templates): ``params -> None``, raising :class:`InputError`. Run by
    #: :func:`check_params` (the config check) and before training and predicting.
    check_settings: Callable[[object], None] | None = None

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"method {self.name}: prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}"
            )
        if not dataclasses.is_dataclass(self.params):
            raise ValueError(f"method {self.name}: params must be a dataclass")

    @property
    def default_params(self) -> dict:
        """The parameters' defaults as a plain dict."""
        return parameters.defaults(self.params)

    def settings(self, values: dict | object | None = None, where: str = "--param"):
        """The parameters object from ``values`` (a dict over the defaults, or already one)."""
        if isinstance(values, self.params):
            return values
        return parameters.build(self.params, values, where)

    def predicts(self, values: dict | object | None = None) -> str:
        """The prediction type of this method run with ``values``."""
        if self.prediction_type_of is None:
            return self.prediction_type
        return self.prediction_type_of(self.settings(values))

    def runnable(self, values: dict | object | None = None, where: str = "--param"):
        """The parameters object, checked as a run needs it (:attr:`check_settings`)."""
        settings = self.settings(values, where)
        if self.check_settings is not None:
            try:
                self.check_settings(settings)
            except InputError as err:
                raise InputError(err.problem, where=f"{where}: {err.where}" if err.where else where) from err
        return settings

    def stage_resources(self, values: dict | None = None) -> dict[str, Resources]:
        return self.resources(self, self.settings(values))

    def run_train(
        self,
        entry: Entry,
        half: int,
        model_dir: str | Path,
        values: dict | object | None = None,
        work_dir: str | Path | None = None,
    ) -> dict:
        """Train on half ``half`` into ``model_dir`` and write its model record; returns the record."""
        settings = self.runnable(values)
        model_dir = Path(model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
        extra = self.train(entry, half, model_dir, settings, Path(work_dir) if work_dir else None)
        return write_model_record(model_dir, self.name, entry, half, dataclasses.asdict(settings), extra)

    def run_predict(
        self,
        model_dir: str | Path,
        entry: Entry,
        half: int,
        out_star: str | Path,
        values: dict | object | None = None,
        transfer: bool = False,
    ) -> Path:
        """Predict half ``half`` with the model in ``model_dir``, which must be this method's model of
        the other half of ``entry`` (or, with ``transfer``, of another entry)."""
        settings = self.runnable(values)
        read_model_record(model_dir, self.name, entry, half, transfer)
        self.predict(Path(model_dir), entry, half, Path(out_star), settings)
        return Path(out_star)


def write_model_record(
    model_dir: Path, method: str, entry: Entry, half: int, params: dict, extra: dict | None = None
) -> dict:
    """``model_dir/model.json``: the method, the entry and half it was trained on, its parameters,
    and ``provenance`` (:mod:`cryopose.provenance`): the method's version (its origin, with
    cryopose's commit for a built-in), the parameters' hash and the training machine."""
    from ..provenance import machine, method_version, params_hash

    record = {
        "method": method,
        "entry": entry.name,
        "trained_on_half": int(half),
        "n_particles": entry.n_particles(half),
        "params": params,
        **(extra or {}),
        "provenance": {
            "method_version": method_version(method_origin(method)),
            "params_hash": params_hash(params),
            "train_machine": machine(),
        },
    }
    model_dir.mkdir(parents=True, exist_ok=True)
    with io.atomic_write(model_dir / "model.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2) + "\n")
    return record


def read_model_record(model_dir: Path, method: str, entry: Entry, half: int, transfer: bool = False) -> dict:
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
            raise InputError(
                f"a transfer predicts another entry than the model's, and this model was trained on {entry.name!r}",
                path=path,
                where="entry",
            )
        return record
    if record.get("entry") != entry.name:
        raise InputError(f"model is for entry {record.get('entry')!r}, not {entry.name!r}", path=path, where="entry")
    if record.get("trained_on_half") != 1 - half:
        raise InputError(
            f"a model trained on half {record.get('trained_on_half')} cannot predict half {half}: "
            f"predictions must come from the model of the other half",
            path=path,
            where="trained_on_half",
        )
    return record


def _discover() -> dict[str, Method]:
    """Every ``cryopose/methods/<name>/`` folder's ``METHOD``, by name."""
    found: dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if not info.ispkg:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        method = getattr(module, "METHOD", None)
        if not isinstance(method, Method):
            raise ImportError(
                f"{Path(module.__file__).parent}: a method folder must export METHOD, a "
                f"cryopose.methods.Method (see docs/add-your-method.md)"
            )
        if method.name != info.name:
            raise ImportError(
                f"{Path(module.__file__).parent}: METHOD.name is {method.name!r}; a method's folder carries its name"
            )
        found[method.name] = method
    return found


class PluginWarning(UserWarning):
    """A method plugin (entry point of the group ``cryopose.methods``) was left out."""


#: The entry-point group through which other packages add methods.
PLUGIN_GROUP = "cryopose.methods"


def _discover_plugins(builtin: dict[str, Method]) -> tuple[dict[str, Method], dict[str, str], dict[str, str]]:
    """The methods of installed packages' ``cryopose.methods`` entry points: ``(methods, origins,
    errors)``, where ``origins`` names each one's distribution and version and ``errors`` says why
    a plugin was left out (one warning each)."""
    found, origins, errors = {}, {}, {}
    for ep in sorted(importlib.metadata.entry_points(group=PLUGIN_GROUP), key=lambda e: e.name):
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "an unnamed distribution"
        try:
            method = ep.load()
            if not isinstance(method, Method):
                raise TypeError(f"{ep.value} is a {type(method).__name__}, not a cryopose.methods.Method")
            if method.name != ep.name:
                raise ValueError(f"{ep.value} is named {method.name!r}, not {ep.name!r} as its entry point")
            if ep.name in builtin or ep.name in found or ep.name.endswith(REFINE_SUFFIX):
                raise ValueError(f"the name {ep.name!r} is taken (a built-in method, another plugin or a +refine)")
        except Exception as err:  # noqa: BLE001 - any failure of someone else's package leaves it out, named
            errors[ep.name] = f"plugin {ep.name!r} ({ep.value}, from {dist}) left out: {type(err).__name__}: {err}"
            warnings.warn(errors[ep.name], PluginWarning, stacklevel=2)
            continue
        found[ep.name], origins[ep.name] = method, dist
    return found, origins, errors


#: ``<method>+refine``: the method's predictions refined locally (:mod:`cryopose.refine`).
REFINE_SUFFIX = "+refine"

_BUILTIN = _discover()
_PLUGINS, _ORIGINS, PLUGIN_ERRORS = _discover_plugins(_BUILTIN)
#: The registered methods by name: the built-in folders, then the plugins.
METHODS: dict[str, Method] = {**_BUILTIN, **_PLUGINS}


def method_origin(name: str) -> str:
    """Where a registered method comes from: ``"cryopose <version>"`` for a built-in, the
    distribution and version of a plugin (for the leaderboard's provenance)."""
    base = name.removesuffix(REFINE_SUFFIX)
    if base in _ORIGINS:
        return _ORIGINS[base]
    from .. import __version__

    return f"cryopose {__version__}"


def _refined(base: Method) -> Method:
    """``base`` followed by the local refinement of its poses and shifts against the training half's
    map (paper Appendix F). Its model folder holds the base model in ``base/`` and ``reference.mrc``."""
    from ..reconstruct import write_half_map
    from ..refine import RefineConfig, refine_predictions

    refine_names = {f.name for f in dataclasses.fields(RefineConfig)}
    base_names = {f.name for f in dataclasses.fields(base.params)}

    def copy(f: dataclasses.Field):
        if f.default_factory is not dataclasses.MISSING:
            return f.name, f.type, dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
        return f.name, f.type, dataclasses.field(default=f.default, metadata=f.metadata)

    def split(settings) -> tuple[object, RefineConfig]:
        values = dataclasses.asdict(settings)
        return (base.params(**{k: values[k] for k in base_names}), RefineConfig(**{k: values[k] for k in refine_names}))

    def post_init(self):
        split(self)  # each part's own rules

    params = dataclasses.make_dataclass(
        f"{base.params.__name__}Refined",
        [copy(f) for f in dataclasses.fields(base.params)] + [copy(f) for f in dataclasses.fields(RefineConfig)],
        frozen=True,
        namespace={"__post_init__": post_init},
    )
    params.__module__ = base.params.__module__  # its annotations are resolved there

    def train(entry, half, model_dir, settings, work_dir=None):
        base_settings, _ = split(settings)
        # A base that asks for a preprocessed copy gets the same images from the raw entry:
        # ParticlesDataset preprocesses on the fly what the copy holds precomputed.
        base.run_train(entry, half, model_dir / "base", base_settings, work_dir)
        write_half_map(entry, half, model_dir / "reference.mrc")

    def predict(model_dir, entry, half, out_star, settings):
        base_settings, refine_settings = split(settings)
        # The base's predictions are scratch: next to the output, removed on any exit (SIGTERM
        # included) and by the next run after a SIGKILL.
        with io.temporary_folder(out_star.parent, out_star.name) as tmp:
            first = Path(tmp) / "base.star"
            # The composite's record was checked (run_predict); the base model is its part.
            base.predict(model_dir / "base", entry, half, first, base_settings)
            refine_predictions(entry, half, first, model_dir / "reference.mrc", out_star, refine_settings)

    def resources(method, settings):
        stages = base.resources(base, split(settings)[0])
        refine = Resources(mem_mb=4000, runtime_min=120, gpus=1)
        return {"train": stages["train"], "predict": stages["predict"], "refine": refine}

    return Method(
        base.name + REFINE_SUFFIX,
        f"{base.name}, then local refinement of its poses and shifts against the training half's map",
        "SO3xR2",
        params,
        train,
        predict,
        needs_preprocessing=False,
        uses_gpu=True,
        resources=resources,
    )


def get_method(name: str) -> Method:
    """The registered method ``name``, or ``<method>+refine`` (that method followed by local
    refinement); :class:`InputError` listing the known ones otherwise."""
    if name.endswith(REFINE_SUFFIX) and name[: -len(REFINE_SUFFIX)] in METHODS:
        return _refined(METHODS[name[: -len(REFINE_SUFFIX)]])
    if name.removesuffix(REFINE_SUFFIX) in PLUGIN_ERRORS:
        raise InputError(PLUGIN_ERRORS[name.removesuffix(REFINE_SUFFIX)], where="method")
    if name not in METHODS:
        raise InputError(
            f"unknown method {name!r}; known methods: {', '.join(sorted(METHODS))} (and "
            f"<method>{REFINE_SUFFIX} for any of them)",
            where="method",
        )
    return METHODS[name]


def check_params(name: str, values: dict, where: str = "--param") -> dict:
    """Judge a method's parameters as its jobs will (known keys, types, ranges, rules between
    fields); returns the full parameters (defaults overlaid). :class:`InputError` names the key,
    the value and what was expected."""
    method = get_method(name)
    return dataclasses.asdict(method.runnable(values, where))


def parse_params(method: Method, pairs: list[str] | None) -> dict:
    """The command line's ``--param key=value`` pairs of ``method``, checked."""
    return parameters.parse_pairs(method.params, pairs)


def method_table(markdown: bool = True) -> str:
    """Every method with its parameters (name, type, default, range, help): the docs' table."""
    lines = []
    for name, method in sorted(METHODS.items()):
        lines += [
            f"### `{name}`",
            "",
            f"{method.description}. Predicts {method.prediction_type}"
            + ("; trains on the preprocessed copy" if method.needs_preprocessing else "")
            + ("; uses a GPU when lent one" if method.uses_gpu else "")
            + "."
            + (f" From the package {_ORIGINS[name]} (a plugin)." if name in _ORIGINS else ""),
            "",
        ]
        rows = parameters.describe(method.params)
        if not rows:
            lines += ["No parameters.", ""]
            continue
        lines += ["| parameter | type | default | allowed | meaning |", "| --- | --- | --- | --- | --- |"]
        for r in rows:
            lines.append(
                f"| `{r['name']}` | {r['type']} | `{json.dumps(r['default'])}` | {r['limits']} | {r['help']} |"
            )
        lines.append("")
    return "\n".join(lines)
