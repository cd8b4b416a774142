# deepdark: nightly reprocessing of a guide-camera archive with Deep-Dark-Net.
#
#   snakemake --cores 8 --profile workflow/profiles/local            # a workstation
#   snakemake --profile workflow/profiles/slurm                      # a SLURM cluster
#
# Stages (one job per night unless said): simulate (embedded default only) -> extract ->
# baseline + train (once, from the dark library) -> predict -> correct, qa -> summary (once).
# The rules are thin calls of the `deepdark` command; the logic lives in the package.

import os

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: os.path.join(workflow.basedir, "config.yaml")


report: "workflow/report/workflow.rst"


include: "rules/common.smk"


check_config(config, "workflow/schema/config.schema.yaml")
validate(config, "workflow/schema/config.schema.yaml")


include: "rules/simulate.smk"
include: "rules/extract.smk"
include: "rules/baseline.smk"
include: "rules/train.smk"
include: "rules/predict.smk"
include: "rules/correct.smk"
include: "rules/qa.smk"
include: "rules/summary.smk"


rule all:
    input:
        rules.summary.output,
    default_target: True
