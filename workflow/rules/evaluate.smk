# Stage 4b: predicted half-maps V0, V1 and the metrics of one (method, entry).

# evaluation.cesped_compatible: score by the CESPED package's definitions (README, "cryopose and
# CESPED"), here and in the generalisation and sensitivity evaluations; they need relion_reconstruct.
CESPED_COMPATIBLE = ["--cesped-compatible"] if config["evaluation"].get("cesped_compatible") else []
if CESPED_COMPATIBLE and RECON["backend"] != "relion":
    raise WorkflowError(
        "evaluation.cesped_compatible reconstructs as CESPED does, with relion_reconstruct: "
        f"set reconstruction.backend to relion (it is {RECON['backend']!r})"
    )


rule evaluate:
    input:
        entry=entry_dir,
        half0="results/predictions/{method}/{entry}/half0.star",
        half1="results/predictions/{method}/{entry}/half1.star",
        gt0="results/ground_truth/{entry}/GT_half0.mrc",
        gt1="results/ground_truth/{entry}/GT_half1.mrc",
        record="results/ground_truth/{entry}/ground_truth.json",
        # The models that made the predictions (a +refine's: its base's), whose records give the
        # leaderboard's provenance (method version, parameters' hash, training machine).
        models=lambda wc: (
            []
            if wc.method in SUBMISSIONS
            else expand(
                "results/models/{method}/{entry}/half{half}",
                method=REFINED.get(wc.method, wc.method),
                entry=wc.entry,
                half=[0, 1],
            )
        ),
    output:
        metrics="results/evaluation/{method}/{entry}/metrics.json",
        particles="results/evaluation/{method}/{entry}/particles.csv",
        fsc="results/evaluation/{method}/{entry}/fsc.csv",
        fsc_plot=report(
            "results/evaluation/{method}/{entry}/fsc.png",
            caption="../report/fsc.rst",
            category="FSC curves",
            labels={"method": "{method}", "entry": "{entry}"},
        ),
        error_plot=report(
            "results/evaluation/{method}/{entry}/angular_errors.png",
            caption="../report/angular_errors.rst",
            category="Angular errors",
            labels={"method": "{method}", "entry": "{entry}"},
        ),
        orientation_plot=report(
            "results/evaluation/{method}/{entry}/orientations.png",
            caption="../report/orientations.rst",
            category="Orientation coverage",
            labels={"method": "{method}", "entry": "{entry}"},
        ),
    params:
        backend=RECON["backend"],
        relion=relion_options(),
        jobs=RECON["jobs"],
        outdir=lambda wc, output: os.path.dirname(output.metrics),
        gtdir=lambda wc, input: os.path.dirname(input.record),
        prediction_type=prediction_type,
        confidence=lambda wc: [] if config["evaluation"]["use_pred_confidence"] else ["--no-pred-confidence"],
        cesped=CESPED_COMPATIBLE,
        submitted=submitted_from,
        model_records=lambda wc, input: (
            ["--model-record", *[os.path.join(m, "model.json") for m in input.models]] if input.models else []
        ),
        # A +refine's refinement parameters, part of its parameters' hash.
        refine_options=lambda wc: method_params(wc) if wc.method in REFINED else [],
        # A config name of its own runs a registered method, whose model records these are.
        registered=lambda wc: (
            ["--registered-method", registered_method(wc.method)]
            if wc.method not in SUBMISSIONS and registered_method(wc.method) != wc.method
            else []
        ),
    log:
        "logs/evaluate/{method}/{entry}.log",
    benchmark:
        "results/benchmarks/evaluate/{method}/{entry}.tsv"
    threads: config["threads"]["reconstruct"]
    resources:
        mem_mb=mem_mb_per_attempt(8000),
        runtime=runtime_per_attempt(120),
    conda:
        "../../envs/cryopose.yaml"
    shell:
        "cryopose evaluate {input.entry:q} --half0 {input.half0:q} --half1 {input.half1:q} "
        "--method {wildcards.method:q} --prediction-type {params.prediction_type:q} --backend {params.backend:q} "
        "{params.confidence:q} {params.cesped:q} {params.submitted:q} {params.relion:q} --jobs {params.jobs:q} "
        "--ground-truth-dir {params.gtdir:q} {params.model_records:q} {params.refine_options:q} {params.registered:q} "
        "--out {params.outdir:q} --quiet > {log:q} 2>&1"
