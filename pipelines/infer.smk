rule infer:
    input:
        model=rules.train.output.model,
        image=WF.stage_dir("ingest") / "images" / "{patient_id}.nii.gz",
    output:
        WF.stage_dir("infer") / "{patient_id}.nii.gz",
    params:
        config=CFG,
        digest=WF.config.section_digest("infer"),
    log:
        WF.log("infer/{patient_id}"),
    threads: 1
    resources:
        gpu=1,
    shell:
        "medseg infer --config {params.config} --model {input.model} --image {input.image} --output {output} --threads {threads} > {log} 2>&1"
