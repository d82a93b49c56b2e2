# Configuration checks and helpers shared by every stage.

import json
import os
import re
import shlex

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

validate(config, schema="../schemas/config.schema.yaml")

ENTRIES = {e["name"]: e for e in config["entries"]}
METHODS = config["methods"]
BENCHMARK_DIR = config["benchmark_dir"]
RECON = config["reconstruction"]


def _check_config():
    from cryopose.methods import METHODS as REGISTERED

    unknown = sorted(set(METHODS) - set(REGISTERED))
    if unknown:
        raise WorkflowError(
            f"config: methods: unknown method(s) {', '.join(unknown)}; registered: {', '.join(sorted(REGISTERED))}"
        )
    for name, params in METHODS.items():
        extra = sorted(set(params or {}) - set(REGISTERED[name].default_params))
        if extra:
            raise WorkflowError(
                f"config: methods: {name}: unknown parameter(s) {', '.join(extra)}; "
                f"{name} takes: {', '.join(sorted(REGISTERED[name].default_params)) or 'none'}"
            )
    for name, e in ENTRIES.items():
        if "simulate" not in e and not os.path.isdir(f"{BENCHMARK_DIR}/{name}"):
            raise WorkflowError(
                f"config: entries: {name} has no 'simulate' parameters, so it must be a real entry in "
                f"{BENCHMARK_DIR}/{name} (particles_{{0,1}}.star, .mrcs, info_{{0,1}}.json, {name}_mask.mrc), "
                f"and that folder does not exist"
            )
    if len(ENTRIES) != len(config["entries"]):
        raise WorkflowError("config: entries: two entries share a name")


_check_config()


wildcard_constraints:
    entry="|".join(map(re.escape, ENTRIES)) if ENTRIES else "[^/]+",
    method="|".join(map(re.escape, METHODS)) if METHODS else "[^/]+",
    half="[01]",


def entry_dir(wildcards):
    return f"{BENCHMARK_DIR}/{wildcards.entry}"


def method_entry_dir(wildcards):
    """The entry a method trains and predicts on: the preprocessed copy when it asks for one."""
    from cryopose.methods import get_method

    if get_method(wildcards.method).needs_preprocessing:
        return f"results/preprocessed/{wildcards.entry}"
    return entry_dir(wildcards)


def method_params(wildcards):
    """`--param key=value` options of a method from the config (values as JSON)."""
    params = METHODS[wildcards.method] or {}
    quoted = (shlex.quote(f"{k}={json.dumps(v)}") for k, v in sorted(params.items()))
    return " ".join(f"--param {q}" for q in quoted)


def prediction_type(wildcards):
    from cryopose.methods import get_method

    return get_method(wildcards.method).prediction_type


def relion_options():
    launcher = RECON.get("relion_launcher", "")
    return f"--relion-launcher '{launcher}'" if RECON["backend"] == "relion" and launcher else ""
