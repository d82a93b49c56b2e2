# Stage 2: one model per (method, entry, half).


rule train:
    input:
        entry=method_entry_dir,
    output:
        model=directory("results/models/{method}/{entry}/half{half}"),
    params:
        options=method_params,
    log:
        "logs/train/{method}/{entry}/half{half}.log",
    benchmark:
        "results/benchmarks/train/{method}/{entry}/half{half}.tsv"
    threads: config["threads"]["train"]
    resources:
        mem_mb=8000,
        gpus=lambda wc: int(config["devices"]["train_gpus"]),
    conda:
        "../../envs/cryopose.yaml"
    shell:
        "cryopose train --method {wildcards.method} --entry {input.entry} --half {wildcards.half} "
        "--out {output.model} {params.options} > {log} 2>&1"
