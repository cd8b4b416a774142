# The embedded default: a simulated dark library and archive, one job per night. Used only for
# the sets (archive, library) whose path is null in the config.


rule simulate:
    output:
        directory(results("simulated/{set}/{night}")),
    params:
        root=lambda wildcards: results(f"simulated/{wildcards.set}"),
        args=simulate_args,
    log:
        results("logs/simulate/{set}/{night}.log"),
    benchmark:
        results("benchmarks/simulate/{set}/{night}.tsv")
    wildcard_constraints:
        set="archive|library",
        night=r"[0-9]{8}",
    threads: 1
    resources:
        mem_mb=2000,
        runtime=20,
    conda:
        env("cpu")
    shell:
        "python3 -m deepdark simulate {params.root} --nights 1 --first-night {wildcards.night} {params.args} > {log} 2>&1"
