# Stage 1: benchmark entries. Simulated entries are made here from their parameters; real CESPED
# entries are downloaded from Zenodo into the same layout (resumable, md5-verified).


rule simulate_entry:
    wildcard_constraints:
        # Only entries with simulation parameters; real entries are never overwritten.
        entry=name_pattern([n for n, e in ALL_ENTRIES.items() if "simulate" in e]),
    output:
        entry=directory(f"{BENCHMARK_DIR}/{{entry}}"),
    params:
        spec=lambda wc: json.dumps({"name": wc.entry, **ALL_ENTRIES[wc.entry]["simulate"]}),
        benchmark_dir=lambda wc, output: os.path.dirname(output.entry),
    log:
        "logs/simulate/{entry}.log",
    benchmark:
        "results/benchmarks/simulate/{entry}.tsv"
    threads: 2
    resources:
        mem_mb=mem_mb_per_attempt(4000),
        runtime=runtime_per_attempt(30),
    conda:
        "../../envs/cryopose.yaml"
    shell:
        "spec=$(mktemp --suffix=.json) && echo '{params.spec}' > $spec && "
        "cryopose simulate --spec $spec --out {params.benchmark_dir} --quiet > {log} 2>&1; "
        "status=$?; rm -f $spec; exit $status"


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
        "cryopose download {wildcards.entry} --out {params.benchmark_dir} --base-url {params.base_url} "
        "--retries {params.retries} > {log} 2>&1"
