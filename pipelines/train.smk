rule train:
    input:
        manifest=WF.manifest,
        resampled=after_checkpoint(checkpoints.ingest, WF.resampled_inputs),
    output:
        model=WF.stage_dir("train") / "model.pt",
        run=WF.stage_dir("train") / "run.json",
        history=WF.stage_dir("train") / "history.tsv",
    params:
        config=CFG,
        digest=WF.config.section_digest("train") + WF.config.section_digest("plan"),
        resample_dir=WF.stage_dir("resample"),
        folder=WF.stage_dir("train"),
    log:
        WF.log("train"),
    threads: workflow.cores
    resources:
        gpu=1,
    shell:
        "medseg train --config {params.config} --manifest {input.manifest} --resample-dir {params.resample_dir} --output-dir {params.folder} --threads {threads} > {log} 2>&1"
