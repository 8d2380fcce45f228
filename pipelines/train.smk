def _resampled(wildcards):
    checkpoints.ingest.get()
    return WF.resampled_inputs()


rule train:
    input:
        manifest=WF.manifest,
        resampled=_resampled,
    output:
        model=WF.stage_dir("train") / "model.pt",
        run=WF.stage_dir("train") / "run.json",
    params:
        digest=WF.config.section_digest("train"),
        resample_dir=WF.stage_dir("resample"),
        folder=WF.stage_dir("train"),
    log:
        WF.log("train"),
    threads: workflow.cores
    resources:
        gpu=1,
    shell:
        "medseg train --config {CFG} --manifest {input.manifest} --resample-dir {params.resample_dir} --output-dir {params.folder} --threads {threads} > {log} 2>&1"
