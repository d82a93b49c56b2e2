# Generalisation experiment (paper section 3.3): the models of an entry predict both halves of
# another entry of the same molecule under other conditions (config `generalisation`); the
# evaluation is the benchmark's, and the table sets it beside the source entry's own score.


rule predict_transfer:
    wildcard_constraints:
        method=name_pattern(TRAINED),
        source=name_pattern(ENTRIES),
        entry=name_pattern(TRANSFERS),
    input:
        entry=method_entry_dir,
        model=lambda wc: f"results/models/{wc.method}/{wc.source}/half{1 - int(wc.half)}",
    output:
        star="results/generalisation/{method}/{source}/{entry}/predictions_half{half}.star",
    params:
        method=lambda wc: registered_method(wc.method),
        options=method_params,
    log:
        "logs/generalisation/predict/{method}/{source}/{entry}/half{half}.log",
    benchmark:
        "results/benchmarks/generalisation/{method}/{source}/{entry}/half{half}.tsv"
    threads: stage_threads("predict")
    resources:
        mem_mb=stage_mem_mb("predict"),
        runtime=stage_runtime("predict"),
        gpu=stage_gpus("predict"),
    conda:
        "../../envs/cryopose.yaml"
    shell:
        "cryopose predict --transfer --method {params.method:q} --model {input.model:q} --entry {input.entry:q} "
        "--half {wildcards.half:q} --out {output.star:q} {params.options:q} > {log:q} 2>&1"


rule evaluate_transfer:
    wildcard_constraints:
        method=name_pattern(TRAINED),
        source=name_pattern(ENTRIES),
        entry=name_pattern(TRANSFERS),
    input:
        entry=entry_dir,
        half0="results/generalisation/{method}/{source}/{entry}/predictions_half0.star",
        half1="results/generalisation/{method}/{source}/{entry}/predictions_half1.star",
        gt0="results/ground_truth/{entry}/GT_half0.mrc",
        gt1="results/ground_truth/{entry}/GT_half1.mrc",
        record="results/ground_truth/{entry}/ground_truth.json",
    output:
        metrics="results/generalisation/{method}/{source}/{entry}/metrics.json",
    params:
        backend=RECON["backend"],
        relion=relion_options(),
        jobs=RECON["jobs"],
        outdir=lambda wc, output: os.path.dirname(output.metrics),
        gtdir=lambda wc, input: os.path.dirname(input.record),
        prediction_type=prediction_type,
        confidence=lambda wc: [] if config["evaluation"]["use_pred_confidence"] else ["--no-pred-confidence"],
        cesped=CESPED_COMPATIBLE,
    log:
        "logs/generalisation/evaluate/{method}/{source}/{entry}.log",
    benchmark:
        "results/benchmarks/generalisation/evaluate/{method}/{source}/{entry}.tsv"
    threads: config["threads"]["reconstruct"]
    resources:
        mem_mb=mem_mb_per_attempt(8000),
        runtime=runtime_per_attempt(120),
    conda:
        "../../envs/cryopose.yaml"
    shell:
        "cryopose evaluate {input.entry:q} --half0 {input.half0:q} --half1 {input.half1:q} "
        "--method {wildcards.method:q} --trained-on {wildcards.source:q} --prediction-type {params.prediction_type:q} "
        "--backend {params.backend:q} {params.confidence:q} {params.cesped:q} {params.relion:q} --jobs {params.jobs:q} "
        "--ground-truth-dir {params.gtdir:q} --out {params.outdir:q} --quiet > {log:q} 2>&1"


rule generalisation:
    input:
        metrics=transfer_targets(),
    output:
        table=report("results/generalisation.csv", caption="../report/generalisation.rst", category="Generalisation"),
        plot=report("results/generalisation.png", caption="../report/generalisation.rst", category="Generalisation"),
    log:
        "logs/generalisation.log",
    benchmark:
        "results/benchmarks/generalisation.tsv"
    threads: 1
    resources:
        mem_mb=mem_mb_per_attempt(1000),
        runtime=runtime_per_attempt(10),
    conda:
        "../../envs/cryopose.yaml"
    shell:
        "cryopose generalisation {input.metrics:q} --out {output.table:q} > {log:q} 2>&1"
