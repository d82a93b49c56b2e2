# Stage 1: benchmark entries. Simulated entries are made here from their parameters; real CESPED
# entries are downloaded from Zenodo into the same layout (resumable, md5-verified).


rule simulate_entry:
    wildcard_constraints:
        # Only entries with simulation parameters; real entries are never overwritten.
        entry=name_pattern([n for n, e in ALL_ENTRIES.items() if "simulate" in e]),
    output:
        entry=directory(f"{BENCHMARK_DIR}/{{entry}}"),
    params:
        # The spec as common.smk built and judged it; the shell gets it as one quoted argument.
        spec=lambda wc: json.dumps(SPECS[wc.entry].to_json()),
        benchmark_dir=lambda wc, output: os.path.dirname(output.entry),
    log:
        log="logs/simulate/{entry}.log",
        # The spec file `cryopose simulate --spec` reads; kept (as a log) so that a message naming
        # it, and the run it describes, can be looked at afterwards.
        spec="logs/simulate/{entry}.spec.json",
    benchmark:
        "results/benchmarks/simulate/{entry}.tsv"
    priority: PRIORITY_TRAINING_CHAIN
    threads: config["threads"]["prepare"]
    resources:
        mem_mb=mem_mb_per_attempt(4000),
        runtime=runtime_per_attempt(30),
    conda:
        "../../envs/cryopose.yaml"
    shell:
        "printf '%s\\n' {params.spec:q} > {log.spec:q} && "
        "cryopose simulate --spec {log.spec:q} --out {params.benchmark_dir:q} --quiet > {log.log:q} 2>&1"


rule download_entry:
    wildcard_constraints:
        entry=name_pattern(DOWNLOADED),
    output:
        entry=directory(f"{BENCHMARK_DIR}/{{entry}}"),
    params:
        benchmark_dir=lambda wc, output: os.path.dirname(output.entry),
        base_url=DOWNLOAD.get("base_url", "https://zenodo.org"),
        retries=DOWNLOAD.get("retries", 5),
    log:
        "logs/download/{entry}.log",
    benchmark:
        "results/benchmarks/download/{entry}.tsv"
    threads: 1
    resources:
        mem_mb=mem_mb_per_attempt(1000),
        runtime=runtime_per_attempt(24 * 60),
    conda:
        "../../envs/cryopose.yaml"
    shell:
        "cryopose download {wildcards.entry:q} --out {params.benchmark_dir:q} --base-url {params.base_url:q} "
        "--retries {params.retries:q} > {log:q} 2>&1"
