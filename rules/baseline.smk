# The traditional method (paper 3.2): median master darks of the library, all temperatures and
# per temperature. Skipped when library.masters names an existing file.


if not config["library"]["masters"]:

    rule baseline:
        input:
            shards=library_shards,
        output:
            results("masters.h5"),
        log:
            results("logs/baseline.log"),
        benchmark:
            results("benchmarks/baseline.tsv")
        conda:
            conda_env("baseline")
        threads: job_threads("baseline")
        resources:
            mem_mb=job_mem_mb("baseline"),
            runtime=job_runtime("baseline"),
        params:
            memory_mb=config["baseline"]["memory_mb"],
        shell:
            "python3 -m deepdark baseline {input.shards:q} --out {output:q} --memory-mb {params.memory_mb}"
            " > {log:q} 2>&1"
