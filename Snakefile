# cryopose: supervised pose estimation benchmark (CESPED protocol).
#   snakemake results/leaderboard.csv            # the embedded synthetic default, on this machine
#   snakemake --configfile config/tiny.yaml      # the CI-sized suite
#   snakemake results/generalisation.csv         # the generalisation experiment alone
#   snakemake results/sensitivity.csv            # metric sensitivity to misalignment alone
# Logic lives in the `cryopose` package; rules call its command line.

from snakemake.utils import min_version

min_version("9.0")


# A --configfile is merged over it key by key, unless it names its own `base` (config/README.md).
configfile: "config/config.yaml"


include: "workflow/rules/common.smk"


# With --sdm apptainer every job runs in this image (containers/cryopose.def: cryopose + RELION).
container: config.get("container", "containers/cryopose.sif")


include: "workflow/rules/entries.smk"
include: "workflow/rules/preprocess.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/predict.smk"
include: "workflow/rules/refine.smk"
include: "workflow/rules/submissions.smk"
include: "workflow/rules/ground_truth.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/leaderboard.smk"
include: "workflow/rules/generalisation.smk"
include: "workflow/rules/sensitivity.smk"


rule all:
    # Every evaluation is a target too: Snakemake does not regenerate a deleted intermediate file
    # while the files made from it are present, so deleting one metrics.json re-runs exactly that
    # evaluation and the leaderboard only because they are listed here.
    input:
        "results/leaderboard.csv",
        expand("results/evaluation/{method}/{entry}/metrics.json", method=SCORED, entry=ENTRIES),
        ["results/generalisation.csv"] if TRANSFERS else [],
        ["results/sensitivity.csv"] if PERTURBATIONS else [],
    default_target: True
