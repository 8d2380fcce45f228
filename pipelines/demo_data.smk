if WF.config.demo_data.enabled:

    rule demo_data:
        output:
            directory(WF.raw_dir),
        params:
            config=CFG,
            digest=WF.config.section_digest("demo_data"),
        log:
            WF.log("demo_data"),
        threads: 1
        resources:
            **WF.resources("demo_data"),
        shell:
            "medseg demo-data --config {params.config} --output {output} > {log} 2>&1"
