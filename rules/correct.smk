# Dark-corrected float32 FITS of every frame of a night (the active mosaic minus the predicted
# dark, provenance in the header, checksums), and the night's manifest.csv. One job per night.


rule correct:
    input:
        predictions=results("predictions/{night}.h5"),
        raw=night_folder("archive"),
    output:
        directory(results("corrected/{night}")),
    params:
        keywords=keywords_arg(),
        cameras=cameras_arg(),
        options=("--include-dark " if config["correct"]["include_dark"] else "")
        + ("--strict" if config["correct"]["strict"] else ""),
    log:
        results("logs/correct/{night}.log"),
    benchmark:
        results("benchmarks/correct/{night}.tsv")
    wildcard_constraints:
        night=r"[0-9]{8}",
    threads: config["threads"]["correct"]
    resources:
        mem_mb=2000,
        runtime=60,
    conda:
        env("cpu")
    shell:
        "python3 -m deepdark correct {input.predictions:q} --out {output:q} {params.options} {params.cameras}"
        " {params.keywords} > {log} 2>&1"
