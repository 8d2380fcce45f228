rule plan:
    input:
        manifest=WF.manifest,
        # the images the manifest lists: Snakemake checks only the outputs a later job asks for, so without this a
        # deleted results/ beside a kept data_manifests/<dataset>.tsv would not run ingest again
        images=rules.ingest.output.folder,
    output:
        WF.plan,
    params:
        config=CFG,
        digest=WF.config.section_digest("plan") + WF.config.section_digest("resample") + WF.config.section_digest("train"),
    log:
        WF.log("plan"),
    threads: 2
    resources:
        **WF.resources("plan"),
    shell:
        "medseg plan --config {params.config} --manifest {input.manifest} --output {output} --threads {threads} > {log} 2>&1"
