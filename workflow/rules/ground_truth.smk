# Stage 4a: the ground-truth half-maps GT0, GT1 of each entry, reconstructed once and shared by
# every method's evaluation.


rule ground_truth_maps:
    input:
        entry=entry_dir,
    output:
        gt0="results/ground_truth/{entry}/GT_half0.mrc",
        gt1="results/ground_truth/{entry}/GT_half1.mrc",
        record="results/ground_truth/{entry}/ground_truth.json",
    params:
        backend=RECON["backend"],
        relion=relion_options(),
        jobs=RECON["jobs"],
        outdir=lambda wc, output: os.path.dirname(output.record),
    log:
        "logs/ground_truth/{entry}.log",
    benchmark:
        "results/benchmarks/ground_truth/{entry}.tsv"
    threads: config["threads"]["reconstruct"]
    resources:
        mem_mb=mem_mb_per_attempt(8000),
        runtime=runtime_per_attempt(120),
    conda:
        "../../envs/cryopose.yaml"
    shell:
        "cryopose ground-truth {input.entry:q} --out {params.outdir:q} --backend {params.backend:q} "
        "--jobs {params.jobs:q} {params.relion:q} --quiet > {log:q} 2>&1"
