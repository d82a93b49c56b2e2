# Stage 1: benchmark entries. Simulated entries are made here from their parameters; real CESPED
# entries are downloaded (a later stage) into the same layout.


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
        mem_mb=4000,
    conda:
        "../../envs/cryopose.yaml"
    shell:
        "spec=$(mktemp --suffix=.json) && echo '{params.spec}' > $spec && "
        "cryopose simulate --spec $spec --out {params.benchmark_dir} --quiet > {log} 2>&1; "
        "status=$?; rm -f $spec; exit $status"
