# Configuration checks and helpers shared by every stage.

import json
import os
import re

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
    return " ".join(f"--param {k}={json.dumps(v)}" for k, v in sorted(params.items()))


def prediction_type(wildcards):
    from cryopose.methods import get_method

    return get_method(wildcards.method).prediction_type


def relion_options():
    launcher = RECON.get("relion_launcher", "")
    return f"--relion-launcher '{launcher}'" if RECON["backend"] == "relion" and launcher else ""
