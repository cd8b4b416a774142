# Dark-corrected float32 FITS of every frame of a night (the active mosaic minus the predicted
# dark, provenance in the header, checksums; tile-compressed as correct.compression says), and
# the night's manifest.csv. One job per night.


rule correct:
    input:
        predictions=results("predictions/{night}.h5"),
        raw=night_folder("archive"),
    output:
        # The manifest, not the folder: Snakemake removes a job's outputs before it runs it, and a
        # rerun must not lose the night's earlier frames before deepdark decides to replace them.
        results("corrected/{night}/manifest.csv"),
    log:
        results("logs/correct/{night}.log"),
    benchmark:
        results("benchmarks/correct/{night}.tsv")
    conda:
        conda_env("correct")
    threads: job_threads("correct")
    resources:
        mem_mb=job_mem_mb("correct"),
        runtime=job_runtime("correct"),
    params:
        out=lambda wildcards, output: os.path.dirname(output[0]),
        options=correct_args(),
        keywords=keywords_args(),
        cameras=cameras_args(),
        compression=config["correct"]["compression"],
        quantize_level=config["correct"]["quantize_level"],
    shell:
        "python3 -m deepdark correct {input.predictions:q} --out {params.out:q} {params.options:q} {params.cameras:q}"
        " --compression {params.compression:q} --quantize-level {params.quantize_level:q}"
        " {params.keywords:q} > {log:q} 2>&1"
