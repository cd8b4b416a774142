# All nights in one table and page: the paper's Table 1 pooled over the archive, the nights
# where the model did worse than the median darks flagged, quarantine and failure counts.


rule summary:
    input:
        qa=lambda wildcards: expand(results("qa/{night}/qa.csv"), night=nights("archive")),
        corrected=lambda wildcards: expand(results("corrected/{night}/manifest.csv"), night=nights("archive")),
    output:
        csv=report(
            results("summary.csv"),
            caption="../workflow/report/summary_csv.rst",
            category="Archive",
            labels={"file": "summary.csv"},
        ),
        html=report(
            results("summary.html"),
            caption="../workflow/report/summary_html.rst",
            category="Archive",
            labels={"file": "summary.html"},
        ),
        table=report(
            results("summary_table1.csv"),
            caption="../workflow/report/summary_table1.rst",
            category="Archive",
            labels={"file": "summary_table1.csv"},
        ),
    log:
        results("logs/summary.log"),
    benchmark:
        results("benchmarks/summary.tsv")
    conda:
        conda_env("summary")
    threads: job_threads("summary")
    resources:
        mem_mb=job_mem_mb("summary"),
        runtime=job_runtime("summary"),
    params:
        qa=results("qa"),
        corrected=results("corrected"),
        # comma-separated nights: 9 bytes a night, far below the shell's 128 kB per argument
        nights=lambda wildcards: ",".join(nights("archive")),
        max_failed=config["summary"]["max_failed_fraction"],
    shell:
        "python3 -m deepdark summary --qa-dir {params.qa:q} --corrected-dir {params.corrected:q} --nights {params.nights:q}"
        " --max-failed-fraction {params.max_failed} --csv {output.csv:q} --html {output.html:q} --table {output.table:q} > {log:q} 2>&1"
