# Stage 2: one model per (method, entry, half). Checkpoints live outside the output folder, which
# Snakemake deletes when a job fails, so that rerunning an interrupted training resumes it.


rule train:
    wildcard_constraints:
        method=name_pattern(TRAINED),
    input:
        entry=method_entry_dir,
    output:
        model=directory("results/models/{method}/{entry}/half{half}"),
    params:
        method=lambda wc: registered_method(wc.method),
        options=method_params,
        work_dir="results/checkpoints/{method}/{entry}/half{half}",
    log:
        "logs/train/{method}/{entry}/half{half}.log",
    benchmark:
        "results/benchmarks/train/{method}/{entry}/half{half}.tsv"
    priority: PRIORITY_TRAINING_CHAIN
    threads: stage_threads("train")
    resources:
        mem_mb=stage_mem_mb("train"),
        runtime=stage_runtime("train"),
        gpu=stage_gpus("train"),
    conda:
        "../../envs/cryopose.yaml"
    shell:
        "cryopose train --method {params.method:q} --entry {input.entry:q} --half {wildcards.half:q} "
        "--out {output.model:q} --work-dir {params.work_dir:q} {params.options:q} > {log:q} 2>&1"
