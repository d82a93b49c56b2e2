# Stage 3: cross-prediction: the model trained on half 1-h predicts half h.


rule predict:
    wildcard_constraints:
        method=name_pattern(TRAINED),
    input:
        entry=method_entry_dir,
        model=lambda wc: f"results/models/{wc.method}/{wc.entry}/half{1 - int(wc.half)}",
    output:
        star="results/predictions/{method}/{entry}/half{half}.star",
    params:
        method=lambda wc: registered_method(wc.method),
        options=method_params,
    log:
        "logs/predict/{method}/{entry}/half{half}.log",
    benchmark:
        "results/benchmarks/predict/{method}/{entry}/half{half}.tsv"
    threads: stage_threads("predict")
    resources:
        mem_mb=stage_mem_mb("predict"),
        runtime=stage_runtime("predict"),
        gpu=stage_gpus("predict"),
    conda:
        "../../envs/cryopose.yaml"
    shell:
        "cryopose predict --method {params.method:q} --model {input.model:q} --entry {input.entry:q} "
        "--half {wildcards.half:q} --out {output.star:q} {params.options:q} > {log:q} 2>&1"
