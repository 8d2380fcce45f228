# One model (train.folds null), or one job per fold and an ensemble of them (train.folds: k).
if WF.folds:

    rule train_fold:
        input:
            manifest=WF.manifest,
            plan=WF.plan,
            resampled=after_checkpoint(checkpoints.ingest, WF.resample_records),
        output:
            model=WF.stage_dir("train") / "fold{fold}" / "model.pt",
            run=WF.stage_dir("train") / "fold{fold}" / "run.json",
            history=WF.stage_dir("train") / "fold{fold}" / "history.tsv",
        params:
            config=CFG,
            digest=WF.config.section_digest("train"),
            resample_dir=WF.stage_dir("resample"),
            folder=lambda w: WF.fold_dir(int(w.fold)),
        log:
            WF.log("train/fold{fold}"),
        benchmark:
            WF.benchmark("train_fold{fold}")
        threads: workflow.cores
        resources:
            **WF.resources("train_fold", gpu=True),
        shell:
            "medseg train --config {params.config} --manifest {input.manifest} --plan {input.plan} --resample-dir {params.resample_dir} --output-dir {params.folder} --fold {wildcards.fold} --threads {threads} > {log} 2>&1"

    rule train:
        input:
            WF.fold_models(),
        output:
            model=WF.model,
            run=WF.stage_dir("train") / "run.json",
            history=WF.stage_dir("train") / "history.tsv",
        params:
            config=CFG,
            folds=" ".join(str(WF.fold_dir(k)) for k in range(WF.folds)),
            folder=WF.stage_dir("train"),
        log:
            WF.log("train/ensemble"),
        threads: 1
        resources:
            **WF.resources("train"),
        shell:
            "medseg ensemble --config {params.config} --fold-dir {params.folds} --output-dir {params.folder} > {log} 2>&1"

else:

    rule train:
        input:
            manifest=WF.manifest,
            plan=WF.plan,
            resampled=after_checkpoint(checkpoints.ingest, WF.resample_records),
        output:
            model=WF.model,
            run=WF.stage_dir("train") / "run.json",
            history=WF.stage_dir("train") / "history.tsv",
        params:
            config=CFG,
            digest=WF.config.section_digest("train"),
            resample_dir=WF.stage_dir("resample"),
            folder=WF.stage_dir("train"),
        log:
            WF.log("train"),
        benchmark:
            WF.benchmark("train")
        threads: workflow.cores
        resources:
            **WF.resources("train", gpu=True),
        shell:
            "medseg train --config {params.config} --manifest {input.manifest} --plan {input.plan} --resample-dir {params.resample_dir} --output-dir {params.folder} --threads {threads} > {log} 2>&1"
