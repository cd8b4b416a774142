# deepdark: nightly reprocessing of a guide-camera archive with Deep-Dark-Net.
#
#   snakemake --cores 8 --profile workflow/profiles/local            # a workstation
#   snakemake --profile workflow/profiles/slurm                      # a SLURM cluster
#
# Stages (one job per night unless said): simulate (embedded default only) -> extract ->
# baseline (once) + physics fit (one job per camera) -> train (once, from the dark library) ->
# predict -> correct, qa -> summary (once).
# The rules are thin calls of the `deepdark` command; the logic lives in the package. The
# helpers, the config validation (defaults: workflow/schema/config.schema.yaml) and the wildcard
# constraints are in rules/common.smk.

import os

from snakemake.utils import min_version

min_version("9.0")


configfile: os.path.join(workflow.basedir, "config.yaml")


report: "workflow/report/workflow.rst"


include: "rules/common.smk"
include: "rules/simulate.smk"
include: "rules/extract.smk"
include: "rules/baseline.smk"
include: "rules/physics.smk"
include: "rules/train.smk"
include: "rules/predict.smk"
include: "rules/correct.smk"
include: "rules/qa.smk"
include: "rules/summary.smk"


onstart:
    hold_results_lock()


rule all:
    default_target: True
    input:
        rules.summary.output,
        every_intermediate,
