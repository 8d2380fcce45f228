rule evaluate:
    input:
        manifest=WF.manifest,
        predictions=after_checkpoint(checkpoints.ingest, WF.postprocess_records),
        run=rules.train.output.run,
    output:
        metrics=WF.stage_dir("evaluate") / "metrics.tsv",
        instances=WF.stage_dir("evaluate") / "instances.tsv",
        summary=WF.stage_dir("evaluate") / "summary.json",
    params:
        config=CFG,
        digest=WF.config.section_digest("evaluate"),
        predictions=WF.stage_dir("postprocess"),
        folder=WF.stage_dir("evaluate"),
    log:
        WF.log("evaluate"),
    threads: 1
    resources:
        **WF.resources("evaluate"),
    shell:
        "medseg evaluate --config {params.config} --manifest {input.manifest} --predictions {params.predictions} --output-dir {params.folder} --run-json {input.run} --skips-ok > {log} 2>&1 && cat {log}"
