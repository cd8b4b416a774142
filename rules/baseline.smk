# The traditional method (paper 3.2): median master darks of the library, all temperatures and
# per temperature. Skipped when library.masters names an existing file.


if not config["library"]["masters"]:

    rule baseline:
        input:
            shards=lambda wildcards: expand(results("library/{night}.h5"), night=nights("library")),
        output:
            results("masters.h5"),
        params:
        log:
            results("logs/baseline.log"),
        benchmark:
            results("benchmarks/baseline.tsv")
        threads: 1
        resources:
            mem_mb=3000,
            runtime=60,
        conda:
            env("cpu")
        shell:
            "python3 -m deepdark baseline {input.shards:q} --out {output:q} --memory-mb 1024 > {log} 2>&1"
