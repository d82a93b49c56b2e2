"""The ``cryopose`` command line: one subcommand per workflow step."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from .errors import InputError
from .guard import refuse_overwriting_inputs  # every writing command calls it before it writes
from .interrupt import Terminated, terminate_with_exception


def _cmd_simulate(args: argparse.Namespace) -> int:
    from .simulate import SUITES, SimulationSpec, simulate_entry, simulate_suite

    if args.list_suites:
        for suite, specs in SUITES.items():
            for s in specs:
                print(
                    f"{suite}\t{s.name}\t{s.symmetry}\tbox {s.box_size}\t{s.pixel_size} Å/px\t"
                    f"{s.n_particles} particles/half\tSNR {s.snr}"
                )
        return 0
    if args.spec:
        path = Path(args.spec)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise InputError(f"not UTF-8 text ({err})", path=path) from err
        except json.JSONDecodeError as err:
            raise InputError(f"not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}", path=path) from err
        # Every spec is judged before the first entry is written; a list's specs are named by index.
        items = list(enumerate(data)) if isinstance(data, list) else [(None, data)]
        specs = [SimulationSpec.from_dict(d, path=path, where=None if i is None else f"[{i}]") for i, d in items]
        _refuse_simulating_over_inputs(args, specs)
        paths = [simulate_entry(s, args.out, overwrite=args.overwrite, progress=not args.quiet) for s in specs]
    elif args.name:
        spec = SimulationSpec(
            name=args.name,
            symmetry=args.symmetry,
            box_size=args.box_size,
            pixel_size=args.pixel_size,
            n_particles=args.n_particles,
            snr=args.snr,
            seed=args.seed,
            source=args.source,
            preferred_fraction=args.preferred_fraction,
        )
        _refuse_simulating_over_inputs(args, [spec])
        paths = [simulate_entry(spec, args.out, overwrite=args.overwrite, progress=not args.quiet)]
    else:
        # An unknown suite or entry is left to simulate_suite's message.
        _refuse_simulating_over_inputs(
            args, [s for s in SUITES.get(args.suite, ()) if not args.entries or s.name in args.entries]
        )
        paths = simulate_suite(
            args.suite, args.out, entries=args.entries, overwrite=args.overwrite, progress=not args.quiet
        )
    for p in paths:
        print(p)
    return 0


def _refuse_simulating_over_inputs(args: argparse.Namespace, specs) -> None:
    """Each spec's entry ``OUT/<name>`` may replace an earlier simulation (--overwrite decides),
    but not lie inside an entry, hold one, or hold the spec file or source map it is made from."""
    refuse_overwriting_inputs(
        {"--out": [Path(args.out) / s.name for s in specs]},
        {"--spec": args.spec, "--source": [s.source for s in specs if s.source != "pseudo"]},
        builds_entries=True,
    )


def _cmd_info(args: argparse.Namespace) -> int:
    entry = _entry(args)
    entry.validate()
    summary = {
        "name": entry.name,
        "symmetry": entry.symmetry,
        "pixel_size_A": entry.pixel_size,
        "box_size": entry.box_size,
        "particles": {str(h): entry.n_particles(h) for h in entry.halves},
        "mask": str(entry.mask_path) if entry.mask_path is not None and entry.mask_path.exists() else None,
        **entry.describe(),
    }
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_import_star(args: argparse.Namespace) -> int:
    from .entry import StarEntry, import_star

    entry = _entry(args)
    if not isinstance(entry, StarEntry):
        raise InputError("expected a particle STAR file (an entry folder is used as it is)", path=args.entry)
    name = args.name or entry.name
    refuse_overwriting_inputs({"--out": Path(args.out) / name}, {"star": entry.input_paths()}, builds_entries=True)
    print(import_star(entry, args.out, name))
    return 0


def _cmd_import_poses(args: argparse.Namespace) -> int:
    from .pose_import import format_of, import_poses

    entry = _entry(args)
    source = Path(args.source)
    fmt = format_of(source, args.format)
    inputs = {"--entry": entry.input_paths(), "--from": source}
    if args.particles:
        inputs["--particles"] = Path(args.particles)
    refuse_overwriting_inputs({"--out": args.out}, inputs)
    entry.validate()
    options = dict(pixel_size=args.pixel_size, box_size=args.box_size, particles_star=args.particles)
    print(import_poses(entry, args.half, source, Path(args.out), fmt=fmt, **options))
    return 0


def _cmd_preprocess(args: argparse.Namespace) -> int:
    from .data import write_preprocessed_entry

    ctf = None if args.ctf_correction == "none" else args.ctf_correction
    entry = _entry(args)
    # The copy replaces OUT/<name> whole: an earlier copy, never the entry itself or a folder holding it.
    refuse_overwriting_inputs(
        {"--out": Path(args.out) / entry.name}, {"entry": entry.input_paths()}, builds_entries=True
    )
    out = write_preprocessed_entry(
        entry,
        args.out,
        image_size=args.image_size,
        crop_fraction=args.crop_fraction,
        normalise=not args.no_normalise,
        ctf_correction=ctf,
        wiener_constant=args.wiener_constant,
        benchmark_dir=args.benchmark_dir,
        progress=not args.quiet,
    )
    print(out)
    return 0


def _entry(args: argparse.Namespace):
    from .entry import resolve_entry

    return resolve_entry(
        args.entry,
        getattr(args, "benchmark_dir", None),
        symmetry=getattr(args, "symmetry", None),
        mask=getattr(args, "mask", None),
    )


def _add_entry_source_args(p: argparse.ArgumentParser) -> None:
    """Options for an entry given as a plain particle STAR file (cryopose.entry.StarEntry)."""
    p.add_argument(
        "--symmetry", help="point group of a particle STAR file's particles (default: the RELION job's job.star)"
    )
    p.add_argument("--mask", help="mask (MRC) for a particle STAR file (default: the RELION job's fn_mask, else none)")


def _reconstruct_options(args: argparse.Namespace) -> dict:
    """Backend options of `reconstruct` from the shared reconstruction arguments."""
    if args.backend == "relion":
        options = {"mpi_processes": args.mpi_processes}
        if args.relion_launcher:
            # Split as a shell would: an image path with a space stays one argument when quoted.
            options["launcher"] = shlex.split(args.relion_launcher)
        return options
    return {"device": args.device} if args.device else {}


#: What every command reading an entry accepts as one.
ENTRY_HELP = "entry folder, particle STAR file (RELION 3.0/3.1; see --symmetry) or entry name in --benchmark-dir"


def _registered_prediction_type(method: str | None) -> str:
    """A registered method's prediction type (an SO3xR2 method's origins are scored without
    --prediction-type); SO3 for predictions of no registered method."""
    from .methods import METHODS, REFINE_SUFFIX

    if method and method.removesuffix(REFINE_SUFFIX) in METHODS:
        return "SO3xR2" if method.endswith(REFINE_SUFFIX) else METHODS[method].prediction_type
    return "SO3"


def _read_model_record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read a model record ({err})", path=path) from err
    if not isinstance(record, dict) or not isinstance(record.get("params"), dict):
        raise InputError("not a model record (model.json of cryopose train)", path=path, where="params")
    return record


def _predictions_provenance(args: argparse.Namespace, entry) -> dict:
    """What ``metrics.json``'s provenance says of the predictions (:mod:`cryopose.provenance`):
    ``method_version``, ``params_hash`` and ``train_machine``, from the records of the models that
    made them (``--model-record``: the method's, or its base's for ``<method>+refine``, of the
    entry trained on) overlaid with ``--param`` (e.g. a +refine's refinement); a submission's
    parameters are its poses (the predictions as the judge reads them, in the entry's order: not
    the files' bytes, which hold their paths and a writer's timestamp). Unknown values are ``None``."""
    import dataclasses

    from .methods import METHODS, REFINE_SUFFIX, get_method, method_origin, parse_params
    from .predictions import load_predictions
    from .provenance import arrays_hash, cryopose_version, method_version, params_hash

    method = args.registered_method or args.method  # what --method runs (a workflow alias names another)
    paths = [Path(p) for p in args.model_record or []]
    if args.submitted_from:
        if paths or args.param:
            raise InputError("a submission has no models nor parameters", where="--model-record/--param")
        kind = args.prediction_type or _registered_prediction_type(method)
        poses = []
        for h, path in zip(entry.halves, (args.half0, args.half1)):
            pred = load_predictions(entry, h, path, kind, use_confidence=not args.no_pred_confidence)
            poses += [pred.rotmats, pred.shifts, pred.confidence]
        return {"method_version": None, "params_hash": arrays_hash(poses), "train_machine": None}
    if (paths or args.param) and method is None:
        raise InputError("name the --method whose models or parameters these are", where="--method")
    base = method.removesuffix(REFINE_SUFFIX) if method else None
    registered = method is not None and base in METHODS
    records = [_read_model_record(p) for p in paths]
    trained_on = args.trained_on or entry.name
    for path, record in zip(paths, records):
        if record.get("method") not in (method, base):
            raise InputError(
                f"a model of method {record.get('method')!r}, not of {method!r}", path=path, where="method"
            )
        if record.get("entry") != trained_on:
            raise InputError(
                f"a model of entry {record.get('entry')!r}, not of {trained_on!r}", path=path, where="entry"
            )
        if record["params"] != records[0]["params"]:
            raise InputError(
                f"trained with other parameters than the model of {paths[0]}: the predictions of two configurations",
                path=path,
                where="params",
            )

    def joined(key: str) -> str | None:
        values = sorted({str(r.get("provenance", {}).get(key)) for r in records if r.get("provenance", {}).get(key)})
        return " | ".join(values) or None

    if not records:
        version = method_version(method_origin(method)) if registered else None
        values = parse_params(get_method(method), args.param) if registered and args.param else None
        if values is not None:
            values = dataclasses.asdict(get_method(method).settings(values))
        return {"method_version": version, "params_hash": params_hash(values), "train_machine": None}
    values = records[0]["params"]
    if registered and (args.param or records[0].get("method") != method):
        # The full parameters of what was run: the models' own, overlaid with those applied after
        # them (a +refine's refinement), defaults filled in as a trained model's record has them.
        overlay = parse_params(get_method(method), args.param)
        values = dataclasses.asdict(get_method(method).settings({**values, **overlay}))
    version = joined("method_version")
    refiner = f"cryopose {cryopose_version()}"
    if records[0].get("method") != method and version is not None and version != refiner:
        version += f"; refined by {refiner}"  # a plugin's models, or cryopose's of another commit
    return {"method_version": version, "params_hash": params_hash(values), "train_machine": joined("train_machine")}


def _evaluation_backend(args: argparse.Namespace) -> dict:
    """The reconstruction options of an evaluating command, its backend settled (relion in the
    CESPED-compatible mode, where evaluate() refuses torch; else torch) and the torch device reported."""
    if args.backend is None:
        args.backend = "relion" if args.cesped_compatible else "torch"
    options = _reconstruct_options(args)
    if args.backend == "torch":
        from .device import report_device, select_device

        report_device("reconstruction (torch)", select_device(options.get("device")))
    return options


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import GROUND_TRUTH_FILES, evaluate, evaluation_files
    from .metric_table import rows

    entry = _entry(args)
    # The files written, not their folders: the workflow evaluates into the folder that holds the
    # predictions (sensitivity, generalisation), which is safe while no written file is one of them.
    gt_dir = args.ground_truth_dir or (Path(args.out) / "ground_truth" if args.out else None)
    refuse_overwriting_inputs(
        {
            "--out": [Path(args.out) / n for n in evaluation_files(not args.no_plots)] if args.out else None,
            "--ground-truth-dir": [Path(gt_dir) / n for n in GROUND_TRUTH_FILES] if gt_dir else None,
        },
        {
            "entry": entry.input_paths(),
            "--half0": args.half0,
            "--half1": args.half1,
            "--model-record": args.model_record,
        },
    )
    provenance = _predictions_provenance(args, entry)
    options = _evaluation_backend(args)
    result = evaluate(
        entry,
        args.half0,
        args.half1,
        prediction_type=args.prediction_type or _registered_prediction_type(args.method),
        backend=args.backend,
        use_pred_confidence=not args.no_pred_confidence,
        outdir=args.out,
        ground_truth_dir=args.ground_truth_dir,
        plots=not args.no_plots,
        progress=not args.quiet,
        jobs=args.jobs,
        method=args.method,
        trained_on=args.trained_on,
        submitted_from=args.submitted_from,
        cesped_compatible=args.cesped_compatible,
        provenance=provenance,
        **options,
    )
    m = result.metrics
    print(
        f"{m['entry']} ({m['symmetry']}, {m['prediction_type']}, backend {m['backend']}, mask from {m['mask_source']})"
    )
    reasons = m.get("null_reasons") or {}
    for row in rows("printed"):  # the metrics, labels and units of cryopose.metric_table
        if row.key not in m:
            continue
        value = m[row.key]
        unit = f" {row.unit}" if row.unit and value is not None else ""
        shown = f"n/a ({reasons.get(row.key, 'undefined')})" if value is None else f"{value:.4g}"
        print(f"  {row.label:<30} {shown}{unit}")
    if m.get("cesped"):
        print("CESPED's metrics (its names and definitions):")
        for name, value in m["cesped"].items():
            print(f"  {name:<30} {'n/a' if value is None else f'{value:.4g}'}")
    if args.out:
        print(f"written to {args.out}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .methods import get_method, parse_params

    method = get_method(args.method)
    entry = _entry(args)
    refuse_overwriting_inputs({"--out": args.out, "--work-dir": args.work_dir}, {"--entry": entry.input_paths()})
    entry.validate()
    method.run_train(
        entry,
        args.half,
        Path(args.out),
        parse_params(method, args.param),
        Path(args.work_dir) if args.work_dir else None,
    )
    print(args.out)
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from .methods import get_method, parse_params

    method = get_method(args.method)
    entry = _entry(args)
    refuse_overwriting_inputs({"--out": args.out}, {"--entry": entry.input_paths(), "--model": args.model})
    entry.validate()
    method.run_predict(
        Path(args.model), entry, args.half, Path(args.out), parse_params(method, args.param), transfer=args.transfer
    )
    print(args.out)
    return 0


def _cmd_refine(args: argparse.Namespace) -> int:
    from . import parameters
    from .reconstruct import write_half_map
    from .refine import RefineConfig, refine_predictions

    entry = _entry(args)
    refuse_overwriting_inputs(
        {"--out": args.out},
        {"--entry": entry.input_paths(), "--predictions": args.predictions, "--reference": args.reference},
    )
    entry.validate()
    config = parameters.build(RefineConfig, parameters.parse_pairs(RefineConfig, args.param))
    with tempfile.TemporaryDirectory(prefix="cryopose-refine-") as tmp:
        # By default the reference the library's <method>+refine is given: the training half's map.
        reference = args.reference or write_half_map(entry, 1 - args.half, Path(tmp) / "reference.mrc")
        refine_predictions(
            entry, args.half, Path(args.predictions), Path(reference), Path(args.out), config, progress=not args.quiet
        )
    print(args.out)
    return 0


def _cmd_methods(args: argparse.Namespace) -> int:
    from .methods import PLUGIN_ERRORS, method_table

    print(method_table())
    for problem in PLUGIN_ERRORS.values():  # also warned about when the registry loaded
        print(f"cryopose methods: {problem}", file=sys.stderr)
    return 0


def _cmd_ground_truth(args: argparse.Namespace) -> int:
    from .evaluate import ground_truth_maps

    entry = _entry(args)
    # The cache is published by replacing the whole folder: the folder is the output.
    refuse_overwriting_inputs({"--out": Path(args.out)}, {"entry": entry.input_paths()})
    entry.validate()
    ground_truth_maps(
        entry,
        Path(args.out),
        backend=args.backend,
        progress=not args.quiet,
        jobs=args.jobs,
        **_reconstruct_options(args),
    )
    print(args.out)
    return 0


def _cmd_leaderboard(args: argparse.Namespace) -> int:
    from .leaderboard import (
        leaderboard_paths,
        leaderboard_table,
        summary_table,
        timings_from_benchmarks,
        to_markdown,
        write_leaderboard,
    )

    refuse_overwriting_inputs(
        {"--out": leaderboard_paths(args.out)},
        {
            "metrics": args.metrics,
            **{f"--{kind}-benchmarks": getattr(args, f"{kind}_benchmarks") for kind in ("train", "predict", "refine")},
        },
    )
    timings = timings_from_benchmarks(
        {kind: getattr(args, f"{kind}_benchmarks") or [] for kind in ("train", "predict", "refine")}
    )
    table = leaderboard_table(args.metrics, timings)
    write_leaderboard(table, args.out)
    print(to_markdown(table, summary_table(table)))
    return 0


def _cmd_merge_leaderboards(args: argparse.Namespace) -> int:
    from .leaderboard import leaderboard_paths, merge_leaderboards, summary_table, to_markdown, write_leaderboard

    refuse_overwriting_inputs({"--out": leaderboard_paths(args.out)}, {"leaderboards": args.leaderboards})
    table, notes = merge_leaderboards(args.leaderboards)
    write_leaderboard(table, args.out)
    print(to_markdown(table, summary_table(table)))
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from .download import CESPED_RECORDS, download_entry

    if args.list:
        for name, (r0, r1) in CESPED_RECORDS.items():
            print(f"{name:6s} records {r0} (half 0), {r1} (half 1)")
        return 0
    if not args.entries:
        raise InputError("name the entries to download (or --list them)", where="entries")
    # OUT/<name> may be kept or built (an entry already there is kept); an unknown name is
    # download_entry's to name.
    refuse_overwriting_inputs(
        {"--out": [Path(args.out) / n for n in args.entries if n in CESPED_RECORDS]}, {}, builds_entries=True
    )
    for name in args.entries:
        print(
            download_entry(
                name,
                Path(args.out),
                base_url=args.base_url,
                retries=args.retries,
                backoff=args.backoff,
                keep_chunks=args.keep_chunks,
                progress=not args.quiet,
            )
        )
    return 0


def _cmd_perturb(args: argparse.Namespace) -> int:
    from .sensitivity import write_perturbed_predictions

    entry = _entry(args)
    refuse_overwriting_inputs({"--out": args.out}, {"--entry": entry.input_paths()})
    entry.validate()
    print(write_perturbed_predictions(entry, args.half, args.perturbation, Path(args.out), seed=args.seed))
    return 0


def _cmd_evaluate_perturbations(args: argparse.Namespace) -> int:
    from .evaluate import GROUND_TRUTH_FILES
    from .sensitivity import evaluate_perturbations, parse_perturbation, perturbation_files

    for name in args.perturbation:  # an unknown name is refused before the entry is even looked up
        parse_perturbation(name)
    entry = _entry(args)
    out_root = Path(args.out_root)
    gt_dir = Path(args.ground_truth_dir) if args.ground_truth_dir else out_root / "ground_truth" / entry.name
    # The files written, not their folders: each level's predictions lie beside its evaluation.
    refuse_overwriting_inputs(
        {
            "--out-root": [
                out_root / name / entry.name / f for name in args.perturbation for f in perturbation_files()
            ],
            "--ground-truth-dir": [gt_dir / n for n in GROUND_TRUTH_FILES],
        },
        {"entry": entry.input_paths()},
    )
    options = _evaluation_backend(args)
    folders = evaluate_perturbations(
        entry,
        args.perturbation,
        out_root,
        ground_truth_dir=gt_dir,
        seed=args.seed,
        backend=args.backend,
        jobs=args.jobs,
        cesped_compatible=args.cesped_compatible,
        progress=not args.quiet,
        report=lambda line: print(line, flush=True),
        **options,
    )
    print(f"{len(folders)} perturbation(s) of {entry.name} written to {out_root}")
    return 0


def _cmd_sensitivity(args: argparse.Namespace) -> int:
    from .sensitivity import (
        missing_values,
        monotone_violations,
        sensitivity_paths,
        sensitivity_table,
        write_sensitivity,
    )

    beside = [Path(p).with_name("fsc.csv") for p in args.metrics]  # read too, for the FSC figure
    refuse_overwriting_inputs(
        {"--out": sensitivity_paths(args.out, any(p.is_file() for p in beside))},
        {"metrics": args.metrics, "fsc.csv": beside},
    )
    table = sensitivity_table(args.metrics)
    fsc = {}
    for path in args.metrics:  # fsc.csv lies beside each metrics.json
        record = json.loads(Path(path).read_text())
        fsc_path = Path(path).with_name("fsc.csv")
        if fsc_path.is_file():
            fsc[(record["entry"], record["method"].split(":", 1)[1])] = fsc_path
    write_sensitivity(table, args.out, fsc)
    # Undefined metrics (null in metrics.json) print as "–" and are listed with their reasons.
    print(table.drop(columns="null_reasons").to_string(index=False, float_format=lambda v: f"{v:.4g}", na_rep="–"))
    for line in dict.fromkeys(missing_values(table)):
        print(f"missing: {line}")
    for line in monotone_violations(table):
        print(f"not monotone: {line}")
    return 0


def _cmd_generalisation(args: argparse.Namespace) -> int:
    from .leaderboard import generalisation_paths, generalisation_table, write_generalisation

    refuse_overwriting_inputs({"--out": generalisation_paths(args.out)}, {"metrics": args.metrics})
    table = generalisation_table(args.metrics)
    write_generalisation(table, args.out)
    print(table.drop(columns="null_reasons").to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep="–"))
    for _, r in table[table["null_reasons"].notna()].iterrows():
        print(f"missing: {r['method']} on {r['entry']} (trained on {r['trained_on']}): {r['null_reasons']}")
    return 0


def _add_reconstruction_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["torch", "relion"], default="torch", help="reconstruction backend")
    p.add_argument("--relion-launcher", help="command prefix for RELION, e.g. 'apptainer exec relion.sif'")
    p.add_argument("--mpi-processes", type=int, default=1, help="relion: mpirun -np N relion_reconstruct_mpi")
    p.add_argument("--device", help="torch backend: cpu or cuda (default: a GPU when there is one)")
    p.add_argument("--benchmark-dir", help="where entry names are looked up")
    _add_entry_source_args(p)


def _add_method_args(p: argparse.ArgumentParser, half_help: str) -> None:
    p.add_argument("--method", required=True, help="a registered method (ground_truth, random, ...)")
    p.add_argument("--entry", required=True, help=ENTRY_HELP)
    p.add_argument("--half", type=int, choices=[0, 1], required=True, help=half_help)
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="method parameter (repeatable)")
    p.add_argument("--benchmark-dir", help="where entry names are looked up")
    _add_entry_source_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cryopose", description=__doc__)
    parser.add_argument("--version", action="version", version=f"cryopose {__import__('cryopose').__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="write synthetic benchmark entries in the CESPED layout")
    p.add_argument("--out", default="resources/benchmark", help="benchmark directory (default: %(default)s)")
    p.add_argument("--suite", default="default", help="named suite to simulate: default or tiny")
    p.add_argument("--entries", nargs="+", help="only these entries of the suite")
    p.add_argument("--spec", help="JSON file with one spec object or a list of them (keys of SimulationSpec)")
    p.add_argument("--name", help="simulate one entry with this name from the options below")
    p.add_argument("--symmetry", default="C1")
    p.add_argument("--box-size", type=int, default=64)
    p.add_argument("--pixel-size", type=float, default=2.13, help="Å per pixel")
    p.add_argument("--n-particles", type=int, default=2000, help="particles per half")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--source", default="pseudo", help="'pseudo', or an MRC map, or a PDB/mmCIF model")
    p.add_argument("--preferred-fraction", type=float, default=0.0)
    p.add_argument("--overwrite", action="store_true", help="replace an entry made from other parameters")
    p.add_argument("--list-suites", action="store_true", help="print the suites and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_simulate)

    p = sub.add_parser(
        "import-star",
        help="make an entry folder of a RELION particle STAR file (e.g. Refine3D/jobNNN/run_data.star): "
        "halves from rlnRandomSubset, stacks left where they are",
    )
    p.add_argument("entry", help="particle STAR file (RELION 3.0/3.1), image names as RELION resolves them")
    p.add_argument("--out", default="resources/benchmark", help="benchmark directory (default: %(default)s)")
    p.add_argument("--name", help="entry name (default: the STAR file's, e.g. job020_run_data)")
    _add_entry_source_args(p)
    p.set_defaults(func=_cmd_import_star)

    p = sub.add_parser(
        "import-poses",
        help="the predictions file of one half of an entry, from the poses of a RELION particle STAR file "
        "(e.g. a refinement's run_data.star), a cryoSPARC .cs file or a cryoDRGN pose pickle, matched by image",
    )
    p.add_argument("--entry", required=True, help=ENTRY_HELP)
    p.add_argument("--half", type=int, choices=[0, 1], required=True, help="the half whose poses are taken")
    p.add_argument(
        "--from",
        dest="source",
        required=True,
        help="the poses: RELION particle STAR (.star, 3.0/3.1), cryoSPARC particles (.cs) or cryoDRGN pose pickle "
        "(.pkl/.pickle)",
    )
    p.add_argument("--format", choices=["relion", "cryosparc", "cryodrgn"], help="override the format the suffix names")
    p.add_argument(
        "--pixel-size",
        type=float,
        help="Å/px of the source job: cryoSPARC, instead of alignments3D/psize_A; cryoDRGN, of the stack the "
        "poses were parsed from (default: the entry's)",
    )
    p.add_argument(
        "--box-size", type=int, help="cryoDRGN: box (px) of the stack the poses were parsed from (default: the entry's)"
    )
    p.add_argument(
        "--particles",
        help="cryoDRGN: the STAR file whose row order the pickle follows (default: the half's own STAR)",
    )
    p.add_argument("--out", required=True, help="predictions STAR (angles, origins in Å, confidence)")
    p.add_argument("--benchmark-dir", help="where entry names are looked up")
    _add_entry_source_args(p)
    p.set_defaults(func=_cmd_import_poses)

    p = sub.add_parser("preprocess", help="write a preprocessed copy of an entry (stacks + STAR) in the same layout")
    p.add_argument("entry", help=ENTRY_HELP)
    p.add_argument("--out", required=True, help="folder to write <entry>/ into")
    p.add_argument(
        "--benchmark-dir", default=None, help="where entry names are looked up (default resources/benchmark)"
    )
    _add_entry_source_args(p)
    p.add_argument("--image-size", type=int, default=None, help="final image size in pixels (default: the cropped box)")
    p.add_argument("--crop-fraction", type=float, default=1.0, help="central fraction of the box to keep")
    p.add_argument("--ctf-correction", choices=["phase_flip", "wiener", "none"], default="phase_flip")
    p.add_argument("--wiener-constant", type=float, default=0.1)
    p.add_argument("--no-normalise", action="store_true", help="skip background normalisation")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_preprocess)

    p = sub.add_parser(
        "evaluate",
        help="reconstruct half-maps from predicted poses and score them (metrics.json, particles.csv, fsc.csv, plots)",
    )
    p.add_argument("entry", help=ENTRY_HELP)
    p.add_argument("--half0", required=True, help="predictions STAR for half 0 (by the model trained on half 1)")
    p.add_argument("--half1", required=True, help="predictions STAR for half 1 (by the model trained on half 0)")
    p.add_argument(
        "--prediction-type",
        choices=["S2", "SO3", "SO3xR2"],
        help="what was predicted; the ground truth fills in the rest (default: the registered --method's "
        "type, else SO3)",
    )
    _add_reconstruction_args(p)
    p.add_argument(
        "--no-pred-confidence",
        action="store_true",
        help="do not weight particles by rlnParticleFigureOfMerit when reconstructing",
    )
    p.add_argument("--out", help="folder for metrics.json, particles.csv, fsc.csv, maps and plots")
    p.add_argument("--ground-truth-dir", help="cache of the ground-truth half-maps (default OUT/ground_truth)")
    p.add_argument("--method", help="name of the method that made the predictions (recorded in metrics.json)")
    p.add_argument("--trained-on", help="entry the models were trained on, when not this one (generalisation)")
    p.add_argument(
        "--submitted-from",
        help="the predictions are finished poses from these files (a submission: nothing was trained; "
        "recorded in metrics.json and the leaderboard)",
    )
    p.add_argument(
        "--model-record",
        nargs="+",
        metavar="MODEL_JSON",
        help="model.json of the models that made the predictions (the method's, or its base's for "
        "<method>+refine): their method version, parameters' hash and training machine go into "
        "metrics.json's provenance and the leaderboard",
    )
    p.add_argument(
        "--param",
        action="append",
        metavar="KEY=VALUE",
        help="a parameter of --method applied to the predictions beyond the models' own (e.g. a +refine's "
        "refinement; repeatable): part of the parameters' hash",
    )
    p.add_argument(
        "--registered-method",
        help="the registered method that --method runs, when --method is a name of the config's own (a "
        "workflow method with a 'method' key); the model records and --param are that method's",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="reconstructions at once (2 runs the two halves side by side: half the time with relion; with "
        "torch on the CPU the threads are shared out, ~10%% faster on 2 cores, twice the memory)",
    )
    p.add_argument(
        "--cesped-compatible",
        action="store_true",
        help="score by the CESPED package's definitions (first FSC crossing, its shell binning and "
        "masking choices, relion backend; CESPED's metrics under its names in metrics.json) instead of "
        "cryopose's; see README, 'cryopose and CESPED'",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_evaluate, backend=None)

    p = sub.add_parser("train", help="train a method on one half of an entry")
    _add_method_args(p, "the half to train on")
    p.add_argument("--work-dir", help="where checkpoints are kept so an interrupted run resumes (default: --out)")
    p.add_argument("--out", required=True, help="model folder")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("predict", help="predict the poses of one half with the model of the other half")
    _add_method_args(p, "the half to predict")
    p.add_argument("--model", required=True, help="model folder written by 'cryopose train' on the other half")
    p.add_argument(
        "--transfer",
        action="store_true",
        help="the model was trained on another entry (generalisation): any half may be predicted",
    )
    p.add_argument("--out", required=True, help="predictions STAR")
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser(
        "refine",
        help="refine predicted poses and shifts of one half locally against a reference "
        "map (the other half's reconstruction)",
    )
    p.add_argument("--entry", required=True, help=ENTRY_HELP + " (raw particles)")
    p.add_argument("--half", type=int, choices=[0, 1], required=True, help="the half the predictions are for")
    p.add_argument("--predictions", required=True, help="predictions STAR to refine")
    p.add_argument(
        "--reference",
        help="reference map on the particles' pixel grid (MRC; default: the other half reconstructed from its "
        "true poses, the reference of the library's <method>+refine)",
    )
    p.add_argument("--out", required=True, help="refined predictions STAR (with rlnOriginX/YAngst)")
    p.add_argument(
        "--param",
        action="append",
        metavar="KEY=VALUE",
        help="refinement parameter (repeatable): local_resolution, local_step, local_rounds, "
        "local_max_shift, local_batch_size, local_device",
    )
    p.add_argument("--benchmark-dir", help="where entry names are looked up")
    _add_entry_source_args(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_refine)

    p = sub.add_parser(
        "ground-truth",
        help="reconstruct an entry's ground-truth half-maps once (the cache "
        "'cryopose evaluate --ground-truth-dir' reuses)",
    )
    p.add_argument("entry", help=ENTRY_HELP)
    p.add_argument("--out", required=True, help="folder for GT_half0.mrc, GT_half1.mrc, ground_truth.json")
    _add_reconstruction_args(p)
    p.add_argument("--jobs", type=int, default=1, help="reconstructions at once")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd_ground_truth)

    p = sub.add_parser("leaderboard", help="gather evaluations into a leaderboard CSV, a summary and Markdown")
    p.add_argument("metrics", nargs="+", help="metrics.json files of 'cryopose evaluate --method ...'")
    p.add_argument("--out", required=True, help="leaderboard CSV (summary and .md are written beside it)")
    p.add_argument("--train-benchmarks", nargs="*", help="Snakemake benchmark files .../train/<method>/<entry>/*.tsv")
    p.add_argument(
        "--predict-benchmarks", nargs="*", help="Snakemake benchmark files .../predict/<method>/<entry>/*.tsv"
    )
    p.add_argument(
        "--refine-benchmarks",
        nargs="*",
        help="Snakemake benchmark files .../refine/<method>+refine/<entry>/*.tsv (added to the base "
        "method's prediction time)",
    )
    p.set_defaults(func=_cmd_leaderboard)

    p = sub.add_parser(
        "merge-leaderboards",
        help="one leaderboard from those of several runs (e.g. a cluster's and a laptop's): no row lost or "
        "repeated; rows that are not comparable (another entry fingerprint, judge version or parameters) refused",
    )
    p.add_argument("leaderboards", nargs="+", help="leaderboard CSV files of cryopose leaderboard (two or more)")
    p.add_argument("--out", required=True, help="merged leaderboard CSV (summary and .md are written beside it)")
    p.set_defaults(func=_cmd_merge_leaderboards)

    p = sub.add_parser("download", help="download real CESPED entries from Zenodo (resumable, md5-verified)")
    p.add_argument("entries", nargs="*", help="entry names: TEST, 10166, 10786, 10280, 11120, 10648, 10409, 10374")
    p.add_argument("--out", default="resources/benchmark", help="benchmark directory (default: %(default)s)")
    p.add_argument("--base-url", default="https://zenodo.org", help="record server (default: %(default)s)")
    p.add_argument("--retries", type=int, default=5, help="retries per file, with exponential backoff")
    p.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds (doubled each time)")
    p.add_argument("--keep-chunks", action="store_true", help="keep the stack chunks after concatenation")
    p.add_argument("--list", action="store_true", help="print the entries and their Zenodo records")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser(
        "generalisation",
        help="compare evaluations of models on their own entry and on another "
        "entry (metrics.json of 'cryopose evaluate --trained-on')",
    )
    p.add_argument("metrics", nargs="+", help="metrics.json files, in-distribution and transfer")
    p.add_argument("--out", required=True, help="table CSV (a bar chart .png is written beside it)")
    p.set_defaults(func=_cmd_generalisation)

    p = sub.add_parser(
        "perturb",
        help="ground-truth predictions with perturbed angles (misalignment sensitivity, the paper's Appendix H)",
    )
    p.add_argument("--entry", required=True, help=ENTRY_HELP)
    p.add_argument("--half", type=int, choices=[0, 1], required=True)
    p.add_argument(
        "--perturbation",
        required=True,
        help="exact, noise<degrees> (uniform noise of ± that on each Euler angle) or random<percent> "
        "(that share of particles with random poses)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="predictions STAR")
    p.add_argument("--benchmark-dir", help="where entry names are looked up")
    _add_entry_source_args(p)
    p.set_defaults(func=_cmd_perturb)

    p = sub.add_parser(
        "evaluate-perturbations",
        help="perturb the ground-truth poses of an entry at each level and evaluate them, in one process "
        "(OUT_ROOT/<perturbation>/<entry>/: half0.star, half1.star and what 'cryopose evaluate --no-plots' "
        "writes, with --method perturbation:<name>)",
    )
    p.add_argument("entry", help=ENTRY_HELP)
    p.add_argument(
        "--perturbation",
        action="append",
        required=True,
        help="exact, noise<degrees> or random<percent> (as 'cryopose perturb'); repeat for each level",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-root", required=True, help="folder for <perturbation>/<entry>/")
    p.add_argument(
        "--ground-truth-dir",
        help="cache of the ground-truth half-maps, shared by every level (default OUT_ROOT/ground_truth/<entry>)",
    )
    _add_reconstruction_args(p)
    p.add_argument("--jobs", type=int, default=1, help="reconstructions at once (as 'cryopose evaluate')")
    p.add_argument(
        "--cesped-compatible",
        action="store_true",
        help="score by the CESPED package's definitions (as 'cryopose evaluate --cesped-compatible')",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars (one line per level is still printed)")
    p.set_defaults(func=_cmd_evaluate_perturbations, backend=None)

    p = sub.add_parser(
        "sensitivity",
        help="table and plots of the map metrics against the perturbation "
        "(metrics.json of 'cryopose evaluate --method perturbation:<name>')",
    )
    p.add_argument("metrics", nargs="+", help="metrics.json files of the perturbed evaluations (and 'exact')")
    p.add_argument("--out", required=True, help="table CSV (.md, .png and _fsc.png are written beside it)")
    p.set_defaults(func=_cmd_sensitivity)

    p = sub.add_parser("methods", help="list the registered methods and their parameters (Markdown)")
    p.set_defaults(func=_cmd_methods)

    p = sub.add_parser("info", help="validate an entry folder and print its summary as JSON")
    p.add_argument("entry", help=ENTRY_HELP)
    _add_entry_source_args(p)
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM (Slurm's and Snakemake's cancel) becomes an exception, so every writer's clean-up
    # runs: temporaries and staging folders are removed and earlier outputs stay as they were.
    try:
        with terminate_with_exception():
            return args.func(args)
    except (InputError, ValueError) as err:
        print(f"cryopose {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a missing file, a full disk, a missing program: the message names it
        print(f"cryopose {args.command}: error: {err}", file=sys.stderr)
        return 1
    except Terminated as stop:
        print(
            f"cryopose {args.command}: {stop}; its temporary files were removed and earlier outputs are unchanged",
            file=sys.stderr,
        )
        return stop.code


if __name__ == "__main__":
    sys.exit(main())
