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
    log:
        results("logs/qa/{night}.log"),
    benchmark:
        results("benchmarks/qa/{night}.tsv")
    conda:
        conda_env("qa")
    threads: job_threads("qa")
    resources:
        mem_mb=job_mem_mb("qa"),
        runtime=job_runtime("qa"),
    params:
        out=lambda wildcards: results(f"qa/{wildcards.night}"),
        keywords=keywords_args(),
        cameras=cameras_args(),
    shell:
        "python3 -m deepdark qa --shard {input.shard:q} --predictions {input.predictions:q} --masters {input.masters:q}"
        " --out {params.out:q} {params.cameras:q} {params.keywords:q} > {log:q} 2>&1"
