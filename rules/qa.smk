# The night's QA: RMSE of the model and the median darks on the night's darks (with the noise
# floor and the paper's figures), star-free background of guide frames after each correction,
# and the quarantine. qa.csv for machines, qa.html for people (bundled by snakemake --report).


rule qa:
    input:
        shard=results("shards/{night}.h5"),
        quarantine=results("shards/{night}.quarantine.csv"),
        predictions=results("predictions/{night}.h5"),
        masters=masters_file(),
    output:
        csv=report(
            results("qa/{night}/qa.csv"),
            caption="../workflow/report/qa_csv.rst",
            category="Nights",
            subcategory="{night}",
            labels={"night": "{night}", "file": "qa.csv"},
        ),
        html=report(
            results("qa/{night}/qa.html"),
            caption="../workflow/report/qa_html.rst",
            category="Nights",
            subcategory="{night}",
            labels={"night": "{night}", "file": "qa.html"},
        ),
        quarantine=results("qa/{night}/quarantine.csv"),
    params:
        out=lambda wildcards: results(f"qa/{wildcards.night}"),
        keywords=keywords_arg(),
        cameras=cameras_arg(),
    log:
        results("logs/qa/{night}.log"),
    benchmark:
        results("benchmarks/qa/{night}.tsv")
    wildcard_constraints:
        night=r"[0-9]{8}",
    threads: config["threads"]["qa"]
    resources:
        mem_mb=3000,
        runtime=30,
    conda:
        env("cpu")
    shell:
        "python3 -m deepdark qa --shard {input.shard:q} --predictions {input.predictions:q} --masters {input.masters:q}"
        " --out {params.out:q} {params.cameras} {params.keywords} > {log} 2>&1"
