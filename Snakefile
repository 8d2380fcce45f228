# medseg workflow: demo-data -> ingest -> plan -> resample -> train -> infer -> postprocess -> evaluate -> report.
# Thin by design: validate the config, include one rule file per stage, define `all`. Paths, shards and target
# lists live in medseg/workflow.py, where pytest reaches them. `config` is what you give (--configfile, --config):
# Workflow.from_snakemake lays it over configs/default.yaml (and configs/demo.yaml while the demo is on).
from medseg.workflow import Workflow, after_checkpoint, listing_digest


WF = Workflow.from_snakemake(config)
CFG = str(WF.config_file)


onstart:
    WF.check_tracking()  # a tracking server that does not answer stops the run before any job starts


include: "pipelines/demo_data.smk"
include: "pipelines/ingest.smk"
include: "pipelines/plan.smk"
include: "pipelines/resample.smk"
include: "pipelines/train.smk"
include: "pipelines/infer.smk"
include: "pipelines/postprocess.smk"
include: "pipelines/evaluate.smk"
include: "pipelines/report.smk"
include: "pipelines/predict.smk"


rule all:
    input:
        WF.final_targets(),
    default_target: True
