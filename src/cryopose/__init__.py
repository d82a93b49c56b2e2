"""cryopose: supervised particle pose estimation benchmark for cryo-EM.

The public API, what a user imports from ``cryopose`` itself (``__all__``):

* :class:`Entry` — a benchmark entry on disk (:mod:`cryopose.entry`);
* :class:`ParticlesDataset` — a ``torch`` dataset over one half of an entry (:mod:`cryopose.data`);
* :func:`evaluate` — the paper's evaluation protocol (:func:`cryopose.evaluate.evaluate`);
* :func:`load_predictions`, :func:`write_predictions` — the predictions STAR format
  (:mod:`cryopose.predictions`);
* :class:`Method`, :data:`METHODS`, :func:`get_method` — the methods registry
  (:mod:`cryopose.methods`);
* :class:`InputError` — what bad input raises (:mod:`cryopose.errors`);
* ``__version__``.

Each name is imported on first use (a module-level ``__getattr__``), so ``import cryopose`` stays
light: it imports neither torch nor any submodule. Everything else lives in its submodule
(``cryopose.io``, ``cryopose.metrics``, ``cryopose.methods.image2sphere``, ...).

``cryopose.evaluate`` is the function, as ``from cryopose import evaluate`` gives it, even after
the submodule of the same name was imported; import that module's other names from it
(``from cryopose.evaluate import ground_truth_maps``).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

__version__ = "0.1.0"

#: Public name → the module that defines it.
_EXPORTS = {
    "Entry": "cryopose.entry",
    "ParticlesDataset": "cryopose.data",
    "evaluate": "cryopose.evaluate",
    "load_predictions": "cryopose.predictions",
    "write_predictions": "cryopose.predictions",
    "Method": "cryopose.methods",
    "METHODS": "cryopose.methods",
    "get_method": "cryopose.methods",
    "InputError": "cryopose.errors",
}

__all__ = [
    "Entry",
    "ParticlesDataset",
    "evaluate",
    "load_predictions",
    "write_predictions",
    "Method",
    "METHODS",
    "get_method",
    "InputError",
    "__version__",
]

if TYPE_CHECKING:  # for type checkers and editors; at run time the names load lazily (__getattr__)
    from .data import ParticlesDataset
    from .entry import Entry
    from .errors import InputError
    from .evaluate import evaluate
    from .methods import METHODS, Method, get_method
    from .predictions import load_predictions, write_predictions


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package's module type: importing the submodule ``cryopose.evaluate`` sets the package's
    attribute ``evaluate`` to the module (Python's import system does it); the public name is the
    function, so the function is kept."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == value.__name__:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
