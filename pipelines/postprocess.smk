rule postprocess_plan:
    input:
        manifest=WF.manifest,
        predictions=after_checkpoint(checkpoints.ingest, WF.decision_records),
    output:
        WF.postprocess_plan,
    params:
        config=CFG,
        digest=WF.config.section_digest("postprocess"),
        folder=WF.stage_dir("infer"),
        splits=WF.decision_splits(),
    log:
        WF.log("postprocess/plan"),
    threads: 1
    shell:
        "medseg postprocess-plan --config {params.config} --manifest {input.manifest} --predictions {params.folder} --output {output} {params.splits} --skips-ok > {log} 2>&1"


rule postprocess:
    input:
        predictions=after_checkpoint(checkpoints.ingest, lambda: WF.infer_records("test")),
        plan=after_checkpoint(checkpoints.ingest, WF.postprocess_plan_inputs),
    output:
        WF.stage_dir("postprocess") / "shards" / "{shard}.json",
    params:
        config=CFG,
        digest=WF.config.section_digest("postprocess"),
        patients=after_checkpoint(checkpoints.ingest, lambda w: " ".join(WF.postprocess_shards()[w.shard])),
        source=WF.stage_dir("infer"),
        folder=WF.stage_dir("postprocess"),
        plan=lambda wildcards, input: f"--plan {input.plan}" if input.plan else "",
    log:
        WF.log("postprocess/{shard}"),
    threads: 2
    shell:
        "medseg postprocess --config {params.config} --input-dir {params.source} --output-dir {params.folder} --patient-id {params.patients} {params.plan} --record {output} --threads {threads} --skips-ok > {log} 2>&1"
