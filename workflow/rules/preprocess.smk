# Stage 1b: a preprocessed copy of an entry (background-normalised, CTF-corrected, resized), for
# the methods that declare `needs_preprocessing`; the oracles use the raw entry.


rule preprocess_entry:
    input:
        entry=entry_dir,
    output:
        entry=directory("results/preprocessed/{entry}"),
    params:
        outdir=lambda wc, output: os.path.dirname(output.entry),
        image_size=lambda wc: (
            ["--image-size", config["preprocessing"]["image_size"]] if config["preprocessing"]["image_size"] else []
        ),
        crop_fraction=config["preprocessing"]["crop_fraction"],
        ctf_correction=config["preprocessing"]["ctf_correction"],
    log:
        "logs/preprocess/{entry}.log",
    benchmark:
        "results/benchmarks/preprocess/{entry}.tsv"
    priority: PRIORITY_TRAINING_CHAIN
    threads: config["threads"]["prepare"]
    resources:
        mem_mb=mem_mb_per_attempt(4000),
        runtime=runtime_per_attempt(60),
    conda:
        "../../envs/cryopose.yaml"
    shell:
        "cryopose preprocess {input.entry:q} --out {params.outdir:q} {params.image_size:q} "
        "--crop-fraction {params.crop_fraction:q} --ctf-correction {params.ctf_correction:q} --quiet > {log:q} 2>&1"
