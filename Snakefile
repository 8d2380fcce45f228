# medseg workflow: demo-data -> ingest -> resample -> train -> infer -> postprocess -> evaluate.
# Thin by design: validate the config, include one rule file per stage, define `all`. Paths and target
# lists live in medseg/workflow.py, where pytest reaches them.
from medseg.workflow import Workflow, after_checkpoint


configfile: workflow.source_path("configs/default.yaml")


WF = Workflow.from_snakemake(config)
CFG = str(WF.config_file)


include: "pipelines/demo_data.smk"
include: "pipelines/ingest.smk"
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
