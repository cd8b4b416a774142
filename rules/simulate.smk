# The embedded default: a simulated dark library and archive, one job per night. Used only for
# the sets (archive, library) whose path is null in the config.


rule simulate:
    output:
        directory(results("simulated/{set}/{night}")),
    log:
        results("logs/simulate/{set}/{night}.log"),
    benchmark:
        results("benchmarks/simulate/{set}/{night}.tsv")
    conda:
        conda_env("simulate")
    threads: job_threads("simulate")
    resources:
        mem_mb=job_mem_mb("simulate"),
        runtime=job_runtime("simulate"),
    params:
        root=lambda wildcards: results(f"simulated/{wildcards.set}"),
        args=simulate_args,
    shell:
        "python3 -m deepdark simulate {params.root:q} --nights 1 --first-night {wildcards.night:q} {params.args:q}"
        " > {log:q} 2>&1"
