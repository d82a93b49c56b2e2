"""The one check every writing command makes before it writes: no output is an input.

A command's outputs are replaced by renaming (a file over a file, a staged folder over a folder),
so an output that is one of the command's inputs, lies inside one, or holds one destroys what the
command reads — and an entry folder, read by every other step, must never receive an output at
all. :func:`refuse_overwriting_inputs` compares the real paths (symlinks, ``.``, ``..`` and trailing
``/`` resolved) and raises :class:`~cryopose.errors.InputError` naming the output, the input or
entry it would damage, and what to do instead.

A hard link is not refused: every writer renames a new file over the output's name
(:func:`cryopose.io.atomic_write`), which unlinks that name and never writes through it, so the
other name keeps its bytes (``tests/cli/test_bad_input_outputs.py`` holds the writers to that).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from .errors import InputError

__all__ = ["refuse_overwriting_inputs", "is_entry_folder"]

#: How many folder levels below an existing output folder are searched for entries: a benchmark
#: folder holds entries one level down, a results folder of preprocessed copies two, the folder
#: above that three. Deeper trees are not searched, so an output folder at a home directory costs
#: a bounded walk rather than a scan of the disk.
ENTRY_SEARCH_DEPTH = 3


def is_entry_folder(folder: Path) -> bool:
    """Whether ``folder`` is a benchmark entry (CESPED layout): it holds a particles STAR of a half."""
    return any((folder / f"particles_{h}.star").is_file() for h in (0, 1))


def _paths(value) -> list[Path]:
    """The paths of one mapping value: a path, several, or ``None`` (an output not asked for)."""
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        return [Path(value)]
    return [Path(v) for v in value if v is not None]


def _entries_below(folder: Path, depth: int) -> Path | None:
    """The first entry folder strictly below ``folder`` (not following symlinks: replacing
    ``folder`` removes a link, not what it points to), searched ``depth`` levels deep."""
    if depth <= 0:
        return None
    try:
        children = sorted((c for c in os.scandir(folder) if c.is_dir(follow_symlinks=False)), key=lambda c: c.name)
    except OSError:  # unreadable: nothing of ours can be written there either
        return None
    for child in children:
        if is_entry_folder(Path(child.path)):
            return Path(child.path)
    for child in children:
        found = _entries_below(Path(child.path), depth - 1)
        if found is not None:
            return found
    return None


def _refuse(out: Path, label: str, relation: str, what: str, real: Path, advice: str) -> InputError:
    # Through a symlink the given path hides what it names: show where it really leads.
    resolved = out.resolve()
    shown = "" if Path(os.path.abspath(out)) == resolved else f" (really {resolved})"
    return InputError(f"refused: this output{shown} {relation} {what} {real}; {advice}", path=out, where=label)


def refuse_overwriting_inputs(
    outputs: Mapping[str, object], inputs: Mapping[str, object] | None = None, *, builds_entries: bool = False
) -> None:
    """Raise :class:`InputError` unless every output is safe to write.

    Args:
        outputs: ``{label: path or paths or None}``, every path the command will create or
            replace (files, or folders it replaces or writes into); the label (``--out``) is the
            option that named it.
        inputs: ``{label: path or paths or None}``, every file or folder the command reads
            (entry folders, predictions, models, maps, metrics files).
        builds_entries: the outputs are entry folders the command builds (preprocess, simulate,
            download), so each may be an existing entry, its own earlier copy, which it replaces —
            but never one of the inputs, an entry it lies inside, or a folder holding entries.

    Refused, for each output: being an input (the same real path), lying inside an input folder,
    holding an input; being an entry folder (unless ``builds_entries``), lying inside one, or
    holding one (searched :data:`ENTRY_SEARCH_DEPTH` levels down, symlinks not followed).
    """
    read = [(label, Path(p), Path(p).resolve()) for label, value in (inputs or {}).items() for p in _paths(value)]
    for label, value in outputs.items():
        for out in _paths(value):
            real = out.resolve()
            for in_label, given, in_real in read:
                what = f"the input {in_label}" + ("" if given == in_real else f" {given}, which is")
                if real == in_real:
                    raise _refuse(
                        out, label, "is", what, in_real, f"an input is never an output: choose another {label}"
                    )
                if in_real in real.parents:
                    raise _refuse(
                        out,
                        label,
                        "lies inside",
                        what,
                        in_real,
                        f"an input is never an output: choose a {label} outside it",
                    )
                if real in in_real.parents:
                    raise _refuse(
                        out,
                        label,
                        "holds",
                        what,
                        in_real,
                        f"writing there could replace or delete it: choose a {label} that does not hold it",
                    )
            entry_advice = f"an entry holds only its own files: choose a {label} outside it"
            for folder in real.parents:
                if is_entry_folder(folder):
                    raise _refuse(out, label, "lies inside", "the entry folder", folder, entry_advice)
            if real.is_dir():
                if is_entry_folder(real) and not builds_entries:
                    raise _refuse(out, label, "is", "the entry folder", real, entry_advice)
                held = _entries_below(real, ENTRY_SEARCH_DEPTH)
                if held is not None:
                    raise _refuse(
                        out,
                        label,
                        "holds",
                        "the entry folder",
                        held,
                        f"writing there could replace or mix with it: choose a {label} that holds no entry",
                    )
