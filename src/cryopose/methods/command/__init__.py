"""``command``: any program as a method — a script in any language, a binary, an Apptainer or
Docker image — run through two shell command templates, ``train`` and ``predict``.

The program sees one half at a time, in the entry layout (``particles_{half}.star`` with absolute
image names, ``info_{half}.json``, the mask) of a temporary folder ``{entry}``:

* **train** gets half ``{half}`` *with* its poses and writes whatever it needs into
  ``{model_dir}`` (the folder is the model; its ``model.json`` is the registry's);
* **predict** gets the other half *blind* (angles, origins, priors and confidences removed) and
  writes a RELION particle STAR file ``{output}`` holding every particle of ``{particles}`` — any
  order, image names in any spelling RELION accepts — with ``rlnAngleRot/Tilt/Psi``, for an
  SO3xR2 method ``rlnOriginXAngst/YAngst`` (Å), and optionally ``rlnMaxValueProbDistribution``
  as the confidence. That file is read by :func:`cryopose.pose_import.import_relion_poses`, which
  matches each particle by its image and checks it as any predictions are checked.

Placeholders, each replaced by its shell-quoted value (a path with spaces or quotes is one word;
write ``{{`` and ``}}`` for literal braces):

``{entry}`` the one-half entry folder; ``{particles}`` its STAR file; ``{half}`` 0 or 1;
``{model_dir}``; ``{output}`` (predict only); ``{threads}`` the threads the job was given;
``{device}`` ``cuda`` when a CUDA device is visible and the method asks for a GPU, else ``cpu``;
``{symmetry}`` the entry's point group; ``{box_size}`` in pixels; ``{pixel_size}`` in Å.

The command runs under ``bash`` from the working directory, its output going to the job's log.
A non-zero exit status, or an output that is missing, lacks a particle of the half or holds
something that is not a pose, stops the job with the command line and the reason.
"""

from __future__ import annotations

import shlex
import string
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ... import io
from ...device import select_device
from ...entry import Entry
from ...errors import InputError
from ...parameters import param, validate
from ...pose_import import import_relion_poses
from ...predictions import PREDICTION_TYPES
from .. import Method, Resources

#: The placeholders each template may use.
PLACEHOLDERS = {
    "train": ("entry", "particles", "half", "model_dir", "threads", "device", "symmetry", "box_size", "pixel_size"),
    "predict": (
        "entry",
        "particles",
        "half",
        "model_dir",
        "output",
        "threads",
        "device",
        "symmetry",
        "box_size",
        "pixel_size",
    ),
}
#: What a template must use: predict writes {output}.
REQUIRED = {"train": (), "predict": ("output",)}

#: Columns a blind half leaves out: the poses and whatever was derived from them.
POSE_DERIVED = (
    "rlnAngleRot",
    "rlnAngleTilt",
    "rlnAnglePsi",
    "rlnAngleRotPrior",
    "rlnAngleTiltPrior",
    "rlnAnglePsiPrior",
    "rlnOriginX",
    "rlnOriginY",
    "rlnOriginXAngst",
    "rlnOriginYAngst",
    "rlnOriginXPrior",
    "rlnOriginYPrior",
    "rlnOriginXPriorAngst",
    "rlnOriginYPriorAngst",
    "rlnMaxValueProbDistribution",
    "rlnNrOfSignificantSamples",
    "rlnLogLikeliContribution",
    "rlnRandomSubset",
)


def template_fields(template: str) -> list[str]:
    """The placeholder names ``template`` uses (``ValueError`` for a malformed one)."""
    names = []
    for _, name, spec, conversion in string.Formatter().parse(template):
        if name is None:
            continue
        if not name or spec or conversion or not name.isidentifier():
            raise ValueError(
                f"placeholder {{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} "
                "is not a plain name; write {{ and }} for literal braces"
            )
        names.append(name)
    return names


def check_template(stage: str, template: str) -> None:
    """``ValueError`` naming an unknown placeholder or a required one missing."""
    if not template.strip():
        return
    used = template_fields(template)
    unknown = sorted(set(used) - set(PLACEHOLDERS[stage]))
    if unknown:
        raise ValueError(
            f"{stage}: unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; "
            f"known: {', '.join('{' + p + '}' for p in PLACEHOLDERS[stage])}"
        )
    missing = [r for r in REQUIRED[stage] if r not in used]
    if missing:
        raise ValueError(f"{stage}: the template must write {', '.join('{' + m + '}' for m in missing)}")


@dataclass(frozen=True)
class Params:
    train: str = param("", "shell command template of the training (module docstring: placeholders)")
    predict: str = param("", "shell command template of the prediction; it writes {output}")
    prediction_type: str = param(
        "SO3xR2", "what the program predicts (SO3xR2: angles and origins)", choices=PREDICTION_TYPES
    )
    threads: int = param(1, "threads of each job ({threads})", min=1)
    gpus: int = param(0, "GPUs each job asks for; 1 makes {device} cuda when one is visible", min=0, max=1)
    mem_mb: int = param(4000, "memory of each job (MB)", min=100)
    runtime_min: int = param(120, "wall time of each job (minutes)", min=1)

    def __post_init__(self):
        validate(self)
        check_template("train", self.train)
        check_template("predict", self.predict)


def check_settings(params: Params) -> None:
    """What a run needs beyond the defaults: both templates."""
    missing = [stage for stage in ("train", "predict") if not getattr(params, stage).strip()]
    if missing:
        raise InputError(
            f"a command method needs its {' and '.join(missing)} command template(s) "
            "(e.g. predict: 'my-tool predict --particles {particles} --model {model_dir} --out {output}')",
            where=", ".join(missing),
        )


def _device(params: Params) -> str:
    """``cuda`` when the method asks for a GPU and one is visible (:mod:`cryopose.device`), else ``cpu``."""
    return select_device("auto" if params.gpus else "cpu").type


def write_half_view(entry: Entry, half: int, folder: Path, blind: bool) -> Path:
    """``folder`` as an entry holding only half ``half`` (absolute image names, its info file,
    the mask), without its poses when ``blind``; returns its STAR file."""
    folder.mkdir(parents=True, exist_ok=True)
    source = entry.read_star(half)
    star = io.with_absolute_image_names(source, source.path)
    if blind:
        star = io.ParticleStar(
            star.optics, star.particles.drop(columns=[c for c in POSE_DERIVED if c in star.particles.columns])
        )
    path = folder / f"particles_{half}.star"
    io.write_particles_star(path, star)
    (folder / f"info_{half}.json").write_bytes(entry.info_bytes(half))
    if entry.mask_path is not None and Path(entry.mask_path).is_file():
        (folder / f"{entry.name}_mask.mrc").write_bytes(Path(entry.mask_path).read_bytes())
    return path


def render(template: str, values: dict) -> str:
    """``template`` with each placeholder replaced by its shell-quoted value."""
    return template.format(**{k: shlex.quote(str(v)) for k, v in values.items()})


def _run(stage: str, template: str, values: dict) -> None:
    command = render(template, values)
    print(f"command method, {stage}: {command}", flush=True)
    sys.stderr.flush()
    done = subprocess.run(["bash", "-c", command])  # its output on ours: the job's log
    if done.returncode != 0:
        raise InputError(
            f"the {stage} command exited with status {done.returncode}: {command} (its output is above)",
            where=stage,
        )


def _values(entry: Entry, half: int, view: Path, star: Path, model_dir: Path, params: Params) -> dict:
    return {
        "entry": view,
        "particles": star,
        "half": half,
        "model_dir": Path(model_dir).resolve(),
        "threads": params.threads,
        "device": _device(params),
        "symmetry": entry.symmetry,
        "box_size": entry.box_size,
        "pixel_size": entry.pixel_size,
    }


def train(entry, half, model_dir, params: Params, work_dir=None):
    check_settings(params)
    with tempfile.TemporaryDirectory(prefix="cryopose-command-train-") as tmp:
        view = Path(tmp) / entry.name
        star = write_half_view(entry, half, view, blind=False)
        _run("train", params.train, _values(entry, half, view, star, model_dir, params))
    return {"train_command": params.train}


def predict(model_dir, entry, half, out_star, params: Params):
    check_settings(params)
    # The program's own file is scratch beside the output; the predictions written are cryopose's.
    with io.temporary_folder(out_star.parent, out_star.name) as tmp:
        view = Path(tmp) / entry.name
        star = write_half_view(entry, half, view, blind=True)
        output = Path(tmp) / "output.star"
        _run("predict", params.predict, {**_values(entry, half, view, star, model_dir, params), "output": output})
        if not output.is_file():
            raise InputError(
                f"the predict command exited normally but did not write {{output}} ({output})", where="predict"
            )
        import_relion_poses(entry, half, output, out_star)


def resources(method, params: Params) -> dict[str, Resources]:
    stage = Resources(threads=params.threads, mem_mb=params.mem_mb, runtime_min=params.runtime_min, gpus=params.gpus)
    return {"train": stage, "predict": stage}


METHOD = Method(
    "command",
    "any program as a method: shell command templates train and predict (docs/add-your-method.md)",
    "SO3xR2",
    Params,
    train,
    predict,
    resources=resources,
    prediction_type_of=lambda params: params.prediction_type,
    check_settings=check_settings,
)
