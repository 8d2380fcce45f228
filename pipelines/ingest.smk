checkpoint ingest:
    input:
        WF.raw_dir,
    output:
        manifest=WF.manifest,
        folder=directory(WF.stage_dir("ingest")),
    params:
        config=CFG,
        digest=WF.config.section_digest("ingest"),
        # a file changed inside the input folder runs ingest again; a function, so that the folder is walked only
        # where ingest is in the DAG (not in each cluster job's own Snakemake)
        files=lambda wildcards: WF.raw_listing_digest(),
    log:
        WF.log("ingest"),
    threads: 1
    resources:
        **WF.resources("ingest"),
    shell:
        "medseg ingest --config {params.config} --input {input} --output {output.folder} --manifest {output.manifest} --skips-ok > {log} 2>&1"
