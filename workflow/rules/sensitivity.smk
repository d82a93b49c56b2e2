# Misalignment sensitivity (paper Appendix H, Tables 4-5, Figures 4-5): the ground-truth poses of
# every entry perturbed by known amounts (config `sensitivity`), evaluated like any method, and the
# map metrics tabulated and plotted against the perturbation.


rule perturb_predictions:
    wildcard_constraints:
        perturbation=PERTURBATION_PATTERN,
        entry=name_pattern(ENTRIES),
    input:
        entry=entry_dir,
    output:
        half0="results/sensitivity/{perturbation}/{entry}/half0.star",
        half1="results/sensitivity/{perturbation}/{entry}/half1.star",
    params:
        seed=SENSITIVITY.get("seed", 0),
    log:
        "logs/sensitivity/perturb/{perturbation}/{entry}.log",
    benchmark:
        "results/benchmarks/sensitivity/perturb/{perturbation}/{entry}.tsv"
    threads: 1
    resources:
        mem_mb=mem_mb_per_attempt(2000),
        runtime=runtime_per_attempt(10),
    conda:
        "../../envs/cryopose.yaml"
    shell:
        "(cryopose perturb --entry {input.entry:q} --half 0 --perturbation {wildcards.perturbation:q} "
        "--seed {params.seed:q} --out {output.half0:q} && "
        "cryopose perturb --entry {input.entry:q} --half 1 --perturbation {wildcards.perturbation:q} "
        "--seed {params.seed:q} --out {output.half1:q}) > {log:q} 2>&1"


rule evaluate_sensitivity:
    wildcard_constraints:
        perturbation=PERTURBATION_PATTERN,
        entry=name_pattern(ENTRIES),
    input:
        entry=entry_dir,
        half0="results/sensitivity/{perturbation}/{entry}/half0.star",
        half1="results/sensitivity/{perturbation}/{entry}/half1.star",
        gt0="results/ground_truth/{entry}/GT_half0.mrc",
        gt1="results/ground_truth/{entry}/GT_half1.mrc",
        record="results/ground_truth/{entry}/ground_truth.json",
    output:
        metrics="results/sensitivity/{perturbation}/{entry}/metrics.json",
        fsc="results/sensitivity/{perturbation}/{entry}/fsc.csv",
    params:
        backend=RECON["backend"],
        relion=relion_options(),
        jobs=RECON["jobs"],
        outdir=lambda wc, output: os.path.dirname(output.metrics),
        gtdir=lambda wc, input: os.path.dirname(input.record),
        cesped=CESPED_COMPATIBLE,
    log:
        "logs/sensitivity/evaluate/{perturbation}/{entry}.log",
    benchmark:
        "results/benchmarks/sensitivity/evaluate/{perturbation}/{entry}.tsv"
    threads: config["threads"]["reconstruct"]
    resources:
        mem_mb=mem_mb_per_attempt(8000),
        runtime=runtime_per_attempt(120),
    conda:
        "../../envs/cryopose.yaml"
    shell:
        "cryopose evaluate {input.entry:q} --half0 {input.half0:q} --half1 {input.half1:q} "
        "--method perturbation:{wildcards.perturbation:q} --prediction-type SO3 --no-pred-confidence "
        "--backend {params.backend:q} {params.cesped:q} {params.relion:q} --jobs {params.jobs:q} "
        "--ground-truth-dir {params.gtdir:q} --out {params.outdir:q} --no-plots --quiet > {log:q} 2>&1"


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
