# `snakemake predict_all`: one job per eligible series of predict.input_dir (set it in the config), so that
# `--cores N` predicts N series at once; predict_all then writes the folder's summary (resuming every series).
if WF.config.predict.input_dir is not None:

    checkpoint predict_series_list:
        input:
            WF.config.predict.input_dir,
        output:
            WF.predict_series_list,
        params:
            config=CFG,
            digest=WF.config.section_digest("ingest"),
            folder=WF.predict_dir,
            # a series added anywhere in the folder lists the series again (Snakemake dates a folder by its top
            # level only); walked only where this job is in the DAG
            files=lambda wildcards: listing_digest(WF.config.predict.input_dir),
        log:
            WF.log("predict/plan"),
        threads: 1
        resources:
            **WF.resources("predict_series_list"),
        shell:
            "medseg predict --config {params.config} --list-series --input {input} --output {params.folder} > {log} 2>&1"

    rule predict:
        input:
            model=WF.predict_model_inputs(),
            # ancient: a new listing (a series added) adds jobs for the new series, without predicting again the
            # series whose record is there
            series=ancient(WF.predict_series_list),
        output:
            WF.predict_record("{series_id}"),
        params:
            config=CFG,
            # the ingest section too: it reads each series by ingest's rules (the series list is ancient here)
            digest=WF.config.section_digest("predict") + WF.config.section_digest("ingest"),
            model=WF.predict_model,
            # models:/<name>@champion: the version it names now, so that promoting another one predicts again
            registered=lambda wildcards: WF.predict_model_version(),
            input=WF.config.predict.input_dir,
            folder=WF.predict_dir,
        log:
            WF.log("predict/{series_id}"),
        threads: 1
        resources:
            **WF.resources("predict", gpu=True),
        shell:
            "medseg predict --config {params.config} --model {params.model} --input {params.input} --output {params.folder} --series-id {wildcards.series_id} --threads {threads} --skips-ok > {log} 2>&1"

    rule predict_all:
        input:
            after_checkpoint(checkpoints.predict_series_list, WF.predict_records),
        output:
            WF.predict_dir / "summary.tsv",
        params:
            config=CFG,
            model=WF.predict_model,
            input=WF.config.predict.input_dir,
            folder=WF.predict_dir,
        log:
            WF.log("predict/summary"),
        threads: 1
        resources:
            **WF.resources("predict_all"),
        shell:
            "medseg predict --config {params.config} --model {params.model} --input {params.input} --output {params.folder} --skips-ok > {log} 2>&1"
