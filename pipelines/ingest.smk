checkpoint ingest:
    input:
        WF.raw_dir,
    output:
        manifest=WF.manifest,
        folder=directory(WF.stage_dir("ingest")),
    params:
        config=CFG,
        digest=WF.config.section_digest("ingest"),
    log:
        WF.log("ingest"),
    threads: 1
    resources:
        **WF.resources("ingest"),
    shell:
        "medseg ingest --config {params.config} --input {input} --output {output.folder} --manifest {output.manifest} --skips-ok > {log} 2>&1"
