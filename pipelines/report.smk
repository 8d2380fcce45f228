rule report:
    input:
        metrics=rules.evaluate.output.metrics,
        summary=rules.evaluate.output.summary,
        manifest=WF.manifest,
        run=rules.train.output.run,
        history=rules.train.output.history,
    output:
        WF.report_file,
    params:
        config=CFG,
        digest=WF.config.section_digest("report"),
        predictions=WF.stage_dir("postprocess"),
    log:
        WF.log("report"),
    threads: 1
    resources:
        **WF.resources("report"),
    shell:
        "medseg report --config {params.config} --metrics {input.metrics} --history {input.history} --manifest {input.manifest} --predictions {params.predictions} --run-json {input.run} --output {output} > {log} 2>&1"
