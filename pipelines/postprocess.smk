rule postprocess:
    input:
        WF.stage_dir("infer") / "{patient_id}.nii.gz",
    output:
        WF.stage_dir("postprocess") / "{patient_id}.nii.gz",
    params:
        config=CFG,
        digest=WF.config.section_digest("postprocess"),
    log:
        WF.log("postprocess/{patient_id}"),
    threads: 1
    shell:
        "medseg postprocess --config {params.config} --input {input} --output {output} > {log} 2>&1"
