# One job per shard of jobs.cases_per_job patients, a pool of `threads` inside.
rule resample:
    input:
        manifest=WF.manifest,
        plan=WF.plan,
    output:
        WF.stage_dir("resample") / "shards" / "{shard}.json",
    params:
        config=CFG,
        digest=WF.config.section_digest("resample"),
        patients=after_checkpoint(checkpoints.ingest, lambda w: " ".join(WF.resample_shards()[w.shard])),
        folder=WF.stage_dir("resample"),
    log:
        WF.log("resample/{shard}"),
    threads: 2
    resources:
        **WF.resources("resample"),
    shell:
        "medseg resample --config {params.config} --manifest {input.manifest} --plan {input.plan} --patient-id {params.patients} --output-dir {params.folder} --threads {threads} --record {output} > {log} 2>&1"
