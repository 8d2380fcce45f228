rule plan:
    input:
        manifest=WF.manifest,
    output:
        WF.plan,
    params:
        config=CFG,
        digest=WF.config.section_digest("plan") + WF.config.section_digest("resample") + WF.config.section_digest("train"),
    log:
        WF.log("plan"),
    threads: 2
    resources:
        **WF.resources("plan"),
    shell:
        "medseg plan --config {params.config} --manifest {input.manifest} --output {output} --threads {threads} > {log} 2>&1"
