# Misalignment sensitivity (paper Appendix H, Tables 4-5, Figures 4-5): the ground-truth poses of
# every entry perturbed by known amounts (config `sensitivity`), evaluated like any method, and the
# map metrics tabulated and plotted against the perturbation.


# One job per entry perturbs and evaluates every level in one process (cryopose
# evaluate-perturbations): the entry is read and the ground-truth maps checked once, not 2 + 1
# start-ups per level.
rule evaluate_sensitivity:
    wildcard_constraints:
        entry=name_pattern(ENTRIES),
    input:
        entry=entry_dir,
        gt0="results/ground_truth/{entry}/GT_half0.mrc",
        gt1="results/ground_truth/{entry}/GT_half1.mrc",
        record="results/ground_truth/{entry}/ground_truth.json",
    output:
        half0=expand(
            "results/sensitivity/{perturbation}/{entry}/half0.star", perturbation=PERTURBATIONS, allow_missing=True
        ),
        half1=expand(
            "results/sensitivity/{perturbation}/{entry}/half1.star", perturbation=PERTURBATIONS, allow_missing=True
        ),
        metrics=expand(
            "results/sensitivity/{perturbation}/{entry}/metrics.json", perturbation=PERTURBATIONS, allow_missing=True
        ),
        fsc=expand("results/sensitivity/{perturbation}/{entry}/fsc.csv", perturbation=PERTURBATIONS, allow_missing=True),
    params:
        perturbations=[arg for name in PERTURBATIONS for arg in ("--perturbation", name)],
        seed=SENSITIVITY.get("seed", 0),
        backend=RECON["backend"],
        relion=relion_options(),
        jobs=RECON["jobs"],
        # results/sensitivity, above <perturbation>/<entry>/metrics.json
        outroot=lambda wc, output: os.path.dirname(os.path.dirname(os.path.dirname(output.metrics[0]))),
        gtdir=lambda wc, input: os.path.dirname(input.record),
        cesped=CESPED_COMPATIBLE,
    log:
        "logs/sensitivity/{entry}.log",
    benchmark:
        "results/benchmarks/sensitivity/{entry}.tsv"
    threads: config["threads"]["reconstruct"]
    resources:
        mem_mb=mem_mb_per_attempt(8000),
        # an evaluation per level, each as long as one of rule evaluate's
        runtime=runtime_per_attempt(120 * max(1, len(PERTURBATIONS))),
    conda:
        "../../envs/cryopose.yaml"
    shell:
        "cryopose evaluate-perturbations {input.entry:q} {params.perturbations:q} --seed {params.seed:q} "
        "--backend {params.backend:q} {params.cesped:q} {params.relion:q} --jobs {params.jobs:q} "
        "--ground-truth-dir {params.gtdir:q} --out-root {params.outroot:q} --quiet > {log:q} 2>&1"


rule sensitivity:
    input:
        metrics=expand(
            "results/sensitivity/{perturbation}/{entry}/metrics.json",
            perturbation=PERTURBATIONS,
            entry=SENSITIVITY_ENTRIES,
        ),
    output:
        table=report("results/sensitivity.csv", caption="../report/sensitivity.rst", category="Sensitivity"),
        markdown="results/sensitivity.md",
        plot=report("results/sensitivity.png", caption="../report/sensitivity.rst", category="Sensitivity"),
        fsc_plot=report("results/sensitivity_fsc.png", caption="../report/sensitivity.rst", category="Sensitivity"),
    log:
        "logs/sensitivity.log",
    benchmark:
        "results/benchmarks/sensitivity.tsv"
    threads: 1
    resources:
        mem_mb=mem_mb_per_attempt(1000),
        runtime=runtime_per_attempt(10),
    conda:
        "../../envs/cryopose.yaml"
    shell:
        "cryopose sensitivity {input.metrics:q} --out {output.table:q} > {log:q} 2>&1"
