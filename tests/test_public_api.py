"""The public API: what ``import cryopose`` offers, and that importing it stays light."""

import subprocess
import sys

import cryopose


def _run(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (this one has imported torch through other tests)."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_every_public_name_resolves():
    from cryopose.data import ParticlesDataset
    from cryopose.entry import Entry
    from cryopose.errors import InputError
    from cryopose.evaluate import evaluate
    from cryopose.methods import METHODS, Method, get_method
    from cryopose.predictions import load_predictions, write_predictions

    expected = {
        "Entry": Entry,
        "ParticlesDataset": ParticlesDataset,
        "evaluate": evaluate,
        "load_predictions": load_predictions,
        "write_predictions": write_predictions,
        "Method": Method,
        "METHODS": METHODS,
        "get_method": get_method,
        "InputError": InputError,
        "__version__": cryopose.__version__,
    }
    assert sorted(cryopose.__all__) == sorted(expected)
    for name in cryopose.__all__:
        assert getattr(cryopose, name) is expected[name], name
    namespace: dict = {}
    exec("from cryopose import *", namespace)
    assert set(cryopose.__all__) <= set(namespace)
    assert set(cryopose.__all__) <= set(dir(cryopose))


def test_unknown_name_is_an_attribute_error():
    assert not hasattr(cryopose, "no_such_name")


def test_import_does_not_import_torch():
    run = _run(
        "import sys, cryopose; assert 'torch' not in sys.modules, 'torch imported'; "
        "assert not [m for m in sys.modules if m.startswith('cryopose.')], 'a submodule imported'"
    )
    assert run.returncode == 0, run.stderr


def test_evaluate_is_the_function_whatever_was_imported_first():
    """Importing the submodule ``cryopose.evaluate`` first must not make the package's ``evaluate``
    the module (Python sets a package's attribute to each submodule it imports)."""
    run = _run(
        "import cryopose.evaluate, cryopose; from cryopose.evaluate import ground_truth_maps; "
        "from cryopose import evaluate; "
        "assert callable(evaluate) and evaluate is cryopose.evaluate, evaluate; "
        "assert evaluate.__module__ == 'cryopose.evaluate'"
    )
    assert run.returncode == 0, run.stderr
