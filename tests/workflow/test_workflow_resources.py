"""Each method's stages get the cluster resources the method declares (``Method.resources``), and
the generalisation experiment's transfer predictions the same as the plain predictions."""

import re

import yaml

from snakemake_runs import _workdir, snakemake


def _jobs(output: str) -> list[dict]:
    """The jobs of a dry run: rule, wildcards, threads and resources."""
    jobs = []
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", output):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.M)
        if not rule:
            continue
        wildcards = dict(re.findall(r"(\w+)=([^,\s]+)", (re.search(r"wildcards: (.*)", block) or [""])[0]))
        threads = re.search(r"threads: (\d+)", block)
        resources = dict(re.findall(r"(\w+)=([^,\s]+)", (re.search(r"resources: (.*)", block) or [""])[0]))
        jobs.append(
            {
                "rule": rule.group(1),
                "wildcards": wildcards,
                "threads": int(threads.group(1)) if threads else 1,
                "resources": resources,
            }
        )
    return jobs


def test_stages_take_the_methods_resources(tmp_path):
    work = _workdir(tmp_path)
    cfg = yaml.safe_load((work / "config" / "tiny.yaml").read_text())
    cfg["entries"] = [e for e in cfg["entries"] if e["name"] == "tiny_c2"]
    cfg["generalisation"][0]["methods"] = ["relion_refine", "random"]
    cfg.pop("sensitivity")
    cfg["methods"] = {"random": {}, "relion_refine": {"mpi_processes": 4, "threads": 3}, "random+refine": {}}
    cfg["devices"] = {"train_gpus": 1}
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = snakemake(work, "-n", "--cores", "16", "results/leaderboard.csv", "results/generalisation.csv").stdout
    jobs = _jobs(out)

    def one(rule, method):
        found = [j for j in jobs if j["rule"] == rule and j["wildcards"].get("method") == method]
        assert found, (rule, method)
        return found[0]

    # relion_refine's auto-refine runs mpi_processes × threads cores for up to a day, on no GPU.
    for rule in ("predict", "predict_transfer"):
        job = one(rule, "relion_refine")
        assert job["threads"] == 12 and job["resources"]["runtime"] == "1440" and job["resources"]["gpu"] == "0"
    # random: the config's train threads, two hours to predict; the refinement of its poses can use a GPU.
    for rule in ("predict", "predict_transfer"):
        job = one(rule, "random")
        assert job["threads"] == cfg["threads"]["train"] and job["resources"]["runtime"] == "120"
    refine = one("refine_predictions", "random+refine")
    assert refine["resources"]["gpu"] == "1" and refine["resources"]["mem_mb"] == "4000"
    assert one("train", "relion_refine")["resources"]["runtime"] == "1440"
