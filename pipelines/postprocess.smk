rule postprocess_plan:
    input:
        manifest=WF.manifest,
        predictions=after_checkpoint(checkpoints.ingest, WF.validation_predictions),
    output:
        WF.postprocess_plan,
    params:
        config=CFG,
        digest=WF.config.section_digest("postprocess"),
        folder=WF.stage_dir("infer"),
    log:
        WF.log("postprocess/plan"),
    threads: 1
    shell:
        "medseg postprocess-plan --config {params.config} --manifest {input.manifest} --predictions {params.folder} --output {output} --skips-ok > {log} 2>&1"


rule postprocess:
    input:
        prediction=WF.stage_dir("infer") / "{patient_id}.nii.gz",
        plan=after_checkpoint(checkpoints.ingest, WF.postprocess_plan_inputs),
    output:
        WF.stage_dir("postprocess") / "{patient_id}.nii.gz",
    params:
        config=CFG,
        digest=WF.config.section_digest("postprocess"),
        plan=lambda wildcards, input: f"--plan {input.plan}" if input.plan else "",
    log:
        WF.log("postprocess/{patient_id}"),
    threads: 1
    shell:
        "medseg postprocess --config {params.config} --input {input.prediction} --output {output} {params.plan} > {log} 2>&1"
