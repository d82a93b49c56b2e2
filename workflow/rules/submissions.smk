# Stage 3c: finished poses as a row of the leaderboard (config `submissions`): each half's poses
# taken from the submitted RELION STAR file, matched to the entry's particles by image and
# checked as any predictions (cryopose import-poses); nothing is trained.


rule import_submission:
    wildcard_constraints:
        method=name_pattern(SUBMISSIONS),
    input:
        entry=entry_dir,
        source=submission_file,
    output:
        star="results/predictions/{method}/{entry}/half{half}.star",
    log:
        "logs/import_submission/{method}/{entry}/half{half}.log",
    threads: 1
    resources:
        mem_mb=mem_mb_per_attempt(2000),
        runtime=runtime_per_attempt(30),
    conda:
        "../../envs/cryopose.yaml"
    shell:
        "cryopose import-poses --entry {input.entry:q} --half {wildcards.half:q} --from {input.source:q} "
        "--out {output.star:q} > {log:q} 2>&1"
