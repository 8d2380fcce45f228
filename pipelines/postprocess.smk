rule postprocess_decide:
    input:
        manifest=WF.manifest,
        predictions=after_checkpoint(checkpoints.ingest, WF.decision_records),
    output:
        WF.postprocess_decision,
    params:
        config=CFG,
        digest=WF.config.section_digest("postprocess"),
        folder=WF.stage_dir("infer"),
        splits=WF.decision_splits(),
    log:
        WF.log("postprocess/decision"),
    threads: 1
    resources:
        **WF.resources("postprocess_decide"),
    shell:
        "medseg postprocess-decide --config {params.config} --manifest {input.manifest} --predictions {params.folder} --output {output} {params.splits} --skips-ok > {log} 2>&1"


rule postprocess:
    input:
        predictions=after_checkpoint(checkpoints.ingest, lambda: WF.infer_records("test")),
        decision=after_checkpoint(checkpoints.ingest, WF.postprocess_decision_inputs),
    output:
        WF.stage_dir("postprocess") / "shards" / "{shard}.json",
    params:
        config=CFG,
        digest=WF.config.section_digest("postprocess"),
        patients=after_checkpoint(checkpoints.ingest, lambda w: " ".join(WF.postprocess_shards()[w.shard])),
        source=WF.stage_dir("infer"),
        folder=WF.stage_dir("postprocess"),
        decision=lambda wildcards, input: f"--decision {input.decision}" if input.decision else "",
    log:
        WF.log("postprocess/{shard}"),
    threads: 2
    resources:
        **WF.resources("postprocess"),
    shell:
        "medseg postprocess --config {params.config} --input-dir {params.source} --output-dir {params.folder} --patient-id {params.patients} {params.decision} --record {output} --threads {threads} --skips-ok > {log} 2>&1"
