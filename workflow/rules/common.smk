# Configuration checks and helpers shared by every stage.

import copy
import json
import os
import re

from snakemake.exceptions import WorkflowError
from snakemake.utils import update_config, validate

from cryopose.download import CESPED_RECORDS

# The Snakefile's `configfile:`: a config file given with --configfile is merged over it key by key,
# unless that file names its own `base` (a file to merge over instead, or null: none).
DEFAULT_CONFIGFILE = "config/config.yaml"


def _load_config_file(path):
    """A config file's content, read with a YAML loader that refuses a key given twice in one
    mapping: Snakemake's loader keeps the last silently, so a method listed twice would run with
    only its second parameters."""
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor" may repeat
                continue
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise WorkflowError(
                    f"{path}: line {line}: duplicate key {key!r} (first given at line {seen[key]}); "
                    "YAML would keep only the last one: give each key once"
                )
            seen[key] = line
        return loader.construct_mapping(node, deep=deep)

    _Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=_Loader)
    except yaml.YAMLError as err:  # rare in a file Snakemake has read already
        raise WorkflowError(f"{path}: not valid YAML: {err}")


def _refuse_duplicate_keys(paths):
    for path in paths:
        _load_config_file(path)


def _base_layers(base):
    """The config files that `base` names, the deepest base first: each file is merged over its
    own `base`, and a file without one over DEFAULT_CONFIGFILE (as if given with --configfile),
    which itself has none. Paths are relative to the working directory, like every path of a config."""
    chain, seen, where = [], {}, "config: base"
    while base is not None and str(base).lower() not in ("none", "null"):  # `--config base=none` gives a string
        if not isinstance(base, str) or not base.strip():
            raise WorkflowError(
                f"{where} must be the path of a config file to merge this one over, or null (none) for a "
                f"config that stands alone; got {base!r}"
            )
        real = os.path.realpath(base)
        if real in seen:
            raise WorkflowError(
                f"{where}: the chain {' -> '.join([*seen.values(), base])} comes back to {base}; "
                "a config cannot be its own base"
            )
        if not os.path.isfile(base):
            raise WorkflowError(
                f"{where}: {base!r} not found (relative to {os.getcwd()}); expected the path of a config file "
                "to merge this one over (e.g. config/config.yaml), or null (none) for a config that stands alone"
            )
        seen[real] = base
        content = _load_config_file(base) or {}
        if not isinstance(content, dict):
            raise WorkflowError(f"{where}: {base} holds no mapping of config keys")
        chain.append(content)
        default = None if real == os.path.realpath(DEFAULT_CONFIGFILE) else DEFAULT_CONFIGFILE
        base, where = content.get("base", default), f"{base}: base"
    return chain[::-1]


def _apply_base():
    """Rebuild `config` when a --configfile (or --config) names its `base`: that file's content
    (after its own base's), then every --configfile in order, then --config; null starts from
    nothing. Keys still unset take the schema's defaults (validate below). Without `base` the
    config stays as Snakemake merged it: the command line's files over DEFAULT_CONFIGFILE."""
    given = workflow.config_settings.overwrite_config  # --configfile files merged in order, then --config
    if "base" not in given:
        return
    rebuilt = {}
    for layer in _base_layers(given["base"]):
        update_config(rebuilt, copy.deepcopy(layer))
    update_config(rebuilt, copy.deepcopy(given))
    config.clear()  # in place: `config` is the workflow's own dict
    config.update(rebuilt)


# The files of the `configfile:` directive and of --configfile (workflow.configfiles holds both).
_refuse_duplicate_keys(workflow.configfiles)
_apply_base()
validate(config, schema="../schemas/config.schema.yaml")

ENTRIES = {e["name"]: e for e in config["entries"]}
# Generalisation experiment: entries that only models of another entry predict (not ranked).
TRANSFERS = {t["name"]: t for t in config.get("generalisation", [])}
ALL_ENTRIES = {**ENTRIES, **TRANSFERS}
# Real CESPED entries not simulated: downloaded from Zenodo unless already on disk.
DOWNLOADED = [n for n, e in ALL_ENTRIES.items() if "simulate" not in e and n in CESPED_RECORDS]
DOWNLOAD = config.get("download", {})
METHODS = config["methods"]
# Finished poses (submissions.smk): scored beside the methods, nothing trained.
SUBMISSIONS = config.get("submissions", {})
# Every row of the leaderboard: the methods, then the submissions.
SCORED = [*METHODS, *SUBMISSIONS]
# Misalignment sensitivity (rules in sensitivity.smk): "exact" plus one perturbation per level.
SENSITIVITY = config.get("sensitivity", {})
from cryopose.sensitivity import perturbation_name

PERTURBATIONS = (
    ["exact"]
    + [perturbation_name("noise", d) for d in SENSITIVITY.get("angular_noise_deg", [])]
    + [perturbation_name("random", p) for p in SENSITIVITY.get("random_percent", [])]
    if SENSITIVITY.get("angular_noise_deg") or SENSITIVITY.get("random_percent")
    else []
)
SENSITIVITY_ENTRIES = SENSITIVITY.get("entries") or list(ENTRIES)
BENCHMARK_DIR = config["benchmark_dir"]
RECON = config["reconstruction"]


def name_pattern(names):
    """A wildcard constraint matching exactly ``names`` (a pattern that matches nothing when empty)."""
    return "|".join(map(re.escape, names)) or "(?!)"


# "<method>+refine": that method's predictions refined locally (rule refine_predictions).
from cryopose.methods import REFINE_SUFFIX

REFINED = {m: m.removesuffix(REFINE_SUFFIX) for m in METHODS if m.endswith(REFINE_SUFFIX)}
TRAINED = [m for m in METHODS if m not in REFINED]
# A config name is the leaderboard's row; its `method` key, when it has one, names the registered
# method it runs (`nearest_view: {method: command, train: ..., predict: ...}`), so one method can
# take part several times with other parameters. `<name>+refine` refines that name's predictions.
ALIAS_KEY = "method"


def registered_method(name):
    """The registered method that the config's method `name` runs."""
    params = METHODS.get(name) or {}
    if ALIAS_KEY in params:
        return params[ALIAS_KEY]
    if name in REFINED:
        return registered_method(REFINED[name]) + REFINE_SUFFIX
    return name


def method_values(name):
    """The parameters of the config's method `name`, without its `method` key."""
    return {k: v for k, v in (METHODS.get(name) or {}).items() if k != ALIAS_KEY}


# The simulation spec of each simulated entry, built (and judged) here exactly as the job builds it
# from the JSON that rule simulate_entry passes on.
SPECS = {}


def _check_values():
    """Build what the jobs will build from the config (each simulation spec, each method's
    settings), so an impossible value stops `snakemake -n` with the key, the value and what was
    expected instead of failing inside a job. Every problem is listed, not only the first."""
    from cryopose.errors import InputError
    from cryopose.methods import check_params
    from cryopose.simulate import SimulationSpec

    problems = []
    if not BENCHMARK_DIR.strip() or "{" in BENCHMARK_DIR or "}" in BENCHMARK_DIR:
        # Every entry's output path starts with it, and Snakemake reads braces there as wildcards.
        problems.append(f"config: benchmark_dir must be a folder path without '{{' or '}}', got {BENCHMARK_DIR!r}")
    absolute = os.path.abspath(BENCHMARK_DIR)
    unsafe = sorted({c for c in absolute if c.isspace() or c in "'\"#"})
    if unsafe:
        # The shell lines quote it fine; STAR files do not: the evaluation's particle image names
        # start with this folder, and STAR values split on whitespace, '#' starts a comment, and
        # starfile 0.5 turns a ' into a " (measured).
        problems.append(
            f"config: benchmark_dir {BENCHMARK_DIR!r} (absolute path {absolute!r}) holds {' '.join(map(repr, unsafe))}; "
            "expected a folder path without whitespace, quotes or '#', which the image names of STAR files cannot carry"
        )
    for section in ("entries", "generalisation"):
        for e in config.get(section, []):
            if "simulate" not in e:
                continue
            where = f"config: {section}: {e['name']}: simulate"
            try:
                spec = SimulationSpec.from_dict({"name": e["name"], **e["simulate"]}, where=where)
            except InputError as err:
                problems.append(str(err))
                continue
            if spec.source != "pseudo" and not os.path.isfile(spec.source):
                problems.append(
                    f"{where}: source {spec.source!r} not found (expected 'pseudo', or the path of an MRC map "
                    f"or a PDB/mmCIF model, relative to {os.getcwd()})"
                )
            SPECS[e["name"]] = spec
    for name in METHODS:  # every name runs a registered method here (_check_config)
        try:
            check_params(registered_method(name), method_values(name), where=f"config: methods: {name}")
        except InputError as err:
            problems.append(str(err))
    if problems:
        raise WorkflowError("impossible value(s) in the config:\n  " + "\n  ".join(problems))


def _check_config():
    from cryopose.methods import METHODS as REGISTERED
    from cryopose.parameters import defaults
    from cryopose.refine import RefineConfig

    for name, params in METHODS.items():
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
            raise WorkflowError(f"config: methods: {name!r}: expected letters, digits, '_', '.', '+' or '-'")
        if ALIAS_KEY not in (params or {}):
            continue
        target = params[ALIAS_KEY]
        if name in REFINED or name in REGISTERED:
            raise WorkflowError(
                f"config: methods: {name}: '{ALIAS_KEY}' names the registered method that a name of your own "
                f"runs; {name} is {'a +refine' if name in REFINED else 'a registered method'} itself"
            )
        if target not in REGISTERED:
            raise WorkflowError(
                f"config: methods: {name}: {ALIAS_KEY} {target!r} is not a registered method "
                f"({', '.join(sorted(REGISTERED))})"
            )
    unknown = sorted(n for n in METHODS if n not in REFINED and registered_method(n) not in REGISTERED)
    if unknown:
        raise WorkflowError(
            f"config: methods: unknown method(s) {', '.join(unknown)}; registered: {', '.join(sorted(REGISTERED))}, "
            f"<method>+refine for any of them, and names of your own with a '{ALIAS_KEY}' key"
        )
    for name in METHODS:
        params = method_values(name)
        if name in REFINED:
            if REFINED[name] not in METHODS:
                raise WorkflowError(
                    f"config: methods: {name} refines the predictions of {REFINED[name]}, which is not in methods"
                )
            accepted = defaults(RefineConfig)
        else:
            accepted = REGISTERED[registered_method(name)].default_params
        extra = sorted(set(params) - set(accepted))
        if extra:
            raise WorkflowError(
                f"config: methods: {name}: unknown parameter(s) {', '.join(extra)}; "
                f"{name} takes: {', '.join(sorted(accepted)) or 'none'}"
            )
    clash = sorted(set(SUBMISSIONS) & (set(METHODS) | set(REGISTERED)))
    if clash:
        raise WorkflowError(
            f"config: submissions: {', '.join(clash)} is also a method's name; give each submission its own"
        )
    for name in SUBMISSIONS:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise WorkflowError(f"config: submissions: {name!r}: expected letters, digits, '_', '.' or '-'")
    for name, t in TRANSFERS.items():
        if name in ENTRIES:
            raise WorkflowError(f"config: generalisation: {name} is also a ranked entry; give it its own name")
        if t["trained_on"] not in ENTRIES:
            raise WorkflowError(f"config: generalisation: {name}: trained_on {t['trained_on']!r} is not an entry")
        missing = sorted(set(t.get("methods", TRAINED)) - set(TRAINED))
        if missing:
            raise WorkflowError(
                f"config: generalisation: {name}: method(s) {', '.join(missing)} are not trained methods in "
                f"methods ({', '.join(TRAINED)})"
            )
    for name, e in ALL_ENTRIES.items():
        if "simulate" not in e and name not in CESPED_RECORDS and not os.path.isdir(f"{BENCHMARK_DIR}/{name}"):
            raise WorkflowError(
                f"config: entries: {name} has no 'simulate' parameters and is not a CESPED entry to download "
                f"({', '.join(CESPED_RECORDS)}), so it must be a real entry in {BENCHMARK_DIR}/{name} "
                f"(particles_{{0,1}}.star, .mrcs, info_{{0,1}}.json, {name}_mask.mrc), and that folder does not exist"
            )
    unknown = sorted(set(SENSITIVITY_ENTRIES) - set(ENTRIES))
    if unknown:
        raise WorkflowError(f"config: sensitivity: entries: {', '.join(unknown)} not in entries ({', '.join(ENTRIES)})")
    if len(ENTRIES) != len(config["entries"]):
        raise WorkflowError("config: entries: two entries share a name")


_check_config()
_check_values()


wildcard_constraints:
    entry=name_pattern(ALL_ENTRIES),
    method="|".join(map(re.escape, SCORED)) if SCORED else "[^/]+",
    half="[01]",


def entry_dir(wildcards):
    return f"{BENCHMARK_DIR}/{wildcards.entry}"


def method_entry_dir(wildcards):
    """The entry a method trains and predicts on: the preprocessed copy when it asks for one."""
    from cryopose.methods import get_method

    if get_method(registered_method(wildcards.method)).needs_preprocessing:
        return f"results/preprocessed/{wildcards.entry}"
    return entry_dir(wildcards)


def method_params(wildcards):
    """`--param key=value` options of a method from the config (values as JSON), as a list of
    arguments: rules write `{params.options:q}`, which quotes each one for the shell."""
    params = method_values(wildcards.method)
    return [arg for k, v in sorted(params.items()) for arg in ("--param", f"{k}={json.dumps(v)}")]


def prediction_type(wildcards):
    from cryopose.methods import get_method

    if wildcards.method in SUBMISSIONS:
        return SUBMISSIONS[wildcards.method].get("prediction_type", "SO3xR2")
    return get_method(registered_method(wildcards.method)).predicts(method_values(wildcards.method))


def submission_file(wildcards):
    """The STAR file holding a submission's poses of one half of an entry."""
    return SUBMISSIONS[wildcards.method]["files"].format(entry=wildcards.entry, half=wildcards.half)


def submitted_from(wildcards):
    """`--submitted-from FILES` of a submission's evaluation (its leaderboard provenance), else nothing."""
    if wildcards.method in SUBMISSIONS:
        return ["--submitted-from", SUBMISSIONS[wildcards.method]["files"]]
    return []


def relion_options():
    """`--relion-launcher PREFIX` as a list of arguments (rules write `{params.relion:q}`)."""
    launcher = RECON.get("relion_launcher", "")
    return ["--relion-launcher", launcher] if RECON["backend"] == "relion" and launcher else []


def transfer_targets():
    """The generalisation experiment's metrics: each transfer entry × its methods, and the same
    methods on the source entry (in distribution) for comparison."""
    out = []
    for name, t in TRANSFERS.items():
        for m in t.get("methods", TRAINED):
            out.append(f"results/generalisation/{m}/{t['trained_on']}/{name}/metrics.json")
            out.append(f"results/evaluation/{m}/{t['trained_on']}/metrics.json")
    return sorted(set(out))


# Resources. Memory and time grow with each attempt, so a job retried (profile `retries`) after
# running out of either asks for more; the network's stages ask for GPUs when the config lends
# them (devices.train_gpus) and the method uses one.
def mem_mb_per_attempt(base):
    return lambda wildcards, attempt: base * attempt


def runtime_per_attempt(minutes):
    return lambda wildcards, attempt: minutes * attempt


def _stage(wildcards, stage):
    """The method's own resources for one stage (``cryopose.methods.Method.resources``)."""
    from cryopose.methods import get_method

    return get_method(registered_method(wildcards.method)).stage_resources(method_values(wildcards.method))[stage]


# Trainings are the long jobs (minutes each, the rest seconds): the rules that lead to them start
# before anything else is ready to run, so that the short jobs fill the cores behind them rather
# than a training starting last and running alone (issue 21: the last of six started at ~30 min).
# Snakemake's scheduler fills a free core with the best job that fits it, so a 2-thread job of high
# priority can wait behind 1-thread jobs for two free cores at once: on 2 cores the default config
# gives the chain's jobs one thread (threads.prepare, threads.train).
PRIORITY_TRAINING_CHAIN = 10


def stage_threads(stage):
    """Threads of a method's stage: the method's own count, else the config's threads.train."""
    return lambda wildcards: _stage(wildcards, stage).threads or config["threads"]["train"]


def stage_mem_mb(stage):
    return lambda wildcards, attempt: _stage(wildcards, stage).mem_mb * attempt


def stage_runtime(stage):
    """Minutes: a RELION auto-refine of a real half runs for hours; the networks predict in minutes."""
    return lambda wildcards, attempt: _stage(wildcards, stage).runtime_min * attempt


def stage_gpus(stage):
    """The config's devices.train_gpus for a stage that can use a GPU, else 0."""
    return lambda wildcards: int(config["devices"]["train_gpus"]) if _stage(wildcards, stage).gpus else 0
