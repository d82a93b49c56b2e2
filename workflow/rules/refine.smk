# Stage 3b: "<method>+refine": the method's cross-predictions refined locally (poses and shifts)
# against the training half's map, the reference a practitioner would have: `cryopose refine`
# reconstructs it as the library's <method>+refine does (cryopose.reconstruct.write_half_map).


rule refine_predictions:
    wildcard_constraints:
        method=name_pattern(REFINED),
    input:
        entry=entry_dir,
        predictions=lambda wc: f"results/predictions/{REFINED[wc.method]}/{wc.entry}/half{wc.half}.star",
    output:
        star="results/predictions/{method}/{entry}/half{half}.star",
    params:
        options=method_params,
    log:
        "logs/refine/{method}/{entry}/half{half}.log",
    benchmark:
        "results/benchmarks/refine/{method}/{entry}/half{half}.tsv"
    threads: stage_threads("refine")
    resources:
        mem_mb=stage_mem_mb("refine"),
        runtime=stage_runtime("refine"),
        gpu=stage_gpus("refine"),
    conda:
        "../../envs/cryopose.yaml"
    shell:
        "cryopose refine --entry {input.entry:q} --half {wildcards.half:q} --predictions {input.predictions:q} "
        "--out {output.star:q} {params.options:q} --quiet > {log:q} 2>&1"
