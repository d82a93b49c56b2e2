# Stage 5: every (method, entry) in one table, a per-method summary, and a Markdown rendering.


rule leaderboard:
    input:
        metrics=expand("results/evaluation/{method}/{entry}/metrics.json", method=SCORED, entry=ENTRIES),
        train=expand(
            "results/benchmarks/train/{method}/{entry}/half{half}.tsv", method=TRAINED, entry=ENTRIES, half=[0, 1]
        ),
        predict=expand(
            "results/benchmarks/predict/{method}/{entry}/half{half}.tsv", method=TRAINED, entry=ENTRIES, half=[0, 1]
        ),
        refine=expand(
            "results/benchmarks/refine/{method}/{entry}/half{half}.tsv", method=REFINED, entry=ENTRIES, half=[0, 1]
        ),
    output:
        table=report("results/leaderboard.csv", caption="../report/leaderboard.rst", category="Leaderboard"),
        summary="results/leaderboard_summary.csv",
        markdown="results/leaderboard.md",
    log:
        "logs/leaderboard.log",
    benchmark:
        "results/benchmarks/leaderboard.tsv"
    threads: 1
    resources:
        mem_mb=mem_mb_per_attempt(1000),
        runtime=runtime_per_attempt(10),
    conda:
        "../../envs/cryopose.yaml"
    shell:
        "cryopose leaderboard {input.metrics:q} --train-benchmarks {input.train:q} "
        "--predict-benchmarks {input.predict:q} --refine-benchmarks {input.refine:q} --out {output.table:q} "
        "> {log:q} 2>&1 && cat {output.markdown:q}"
