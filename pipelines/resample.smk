rule resample:
    input:
        manifest=WF.manifest,
    output:
        image=WF.stage_dir("resample") / "{patient_id}_image.nii.gz",
        label=WF.stage_dir("resample") / "{patient_id}_label.nii.gz",
        record=WF.stage_dir("resample") / "{patient_id}.json",
    params:
        config=CFG,
        digest=WF.config.section_digest("resample"),
        folder=WF.stage_dir("resample"),
    log:
        WF.log("resample/{patient_id}"),
    threads: 1
    shell:
        "medseg resample --config {params.config} --manifest {input.manifest} --patient-id {wildcards.patient_id} --output-dir {params.folder} > {log} 2>&1"
