# One job per shard of patients and one model load: test patients by the model (or the folds' ensemble), and for
# the keep-largest decision the val patients, or with folds each fold's held-out patients by that fold's model.
# One torch thread per job: shards run side by side, and torch threads of two jobs sharing cores wait for each
# other (24 hippocampus cases in two jobs: 16 s with 1 thread each, 21 s with 2; BENCHMARKS.md).
rule infer:
    input:
        manifest=WF.manifest,
        model=lambda w: WF.model_for(w.shard),
    output:
        WF.stage_dir("infer") / "shards" / "{shard}.json",
    params:
        config=CFG,
        digest=WF.config.section_digest("infer"),
        crf=WF.config.postprocess.crf.model_dump_json(),  # the CRF refines the probabilities here, in infer
        patients=after_checkpoint(checkpoints.ingest, lambda w: " ".join(WF.infer_shards()[w.shard])),
        folder=WF.stage_dir("infer"),
    log:
        WF.log("infer/{shard}"),
    threads: 1
    resources:
        **WF.resources("infer", gpu=True),
    shell:
        "medseg infer --config {params.config} --model {input.model} --manifest {input.manifest} --patient-id {params.patients} --output-dir {params.folder} --record {output} --threads {threads} > {log} 2>&1"
