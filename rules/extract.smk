# Strips of every frame of a night into one HDF5 shard, with the night's quarantine table
# (files that cannot be used, and why). Archive nights -> shards/, library nights -> library/.


rule extract:
    input:
        night=night_folder("archive"),
        # the night's file list: a file completed or replaced since the last run reruns the night
        inventory=night_inventory("archive"),
    output:
        shard=results("shards/{night}.h5"),
        quarantine=results("shards/{night}.quarantine.csv"),
    log:
        results("logs/extract/{night}.log"),
    benchmark:
        results("benchmarks/extract/{night}.tsv")
    conda:
        conda_env("extract")
    threads: job_threads("extract")
    resources:
        mem_mb=job_mem_mb("extract"),
        runtime=job_runtime("extract"),
    params:
        geometry=config["geometry"],
        keywords=keywords_args(),
        cameras=cameras_args(),
    shell:
        "python3 -m deepdark extract {input.night:q} --out {output.shard:q} --geometry {params.geometry:q}"
        " {params.keywords:q} {params.cameras:q} > {log:q} 2>&1"


use rule extract as extract_library with:
    input:
        night=night_folder("library"),
        inventory=night_inventory("library"),
    output:
        shard=results("library/{night}.h5"),
        quarantine=results("library/{night}.quarantine.csv"),
    log:
        results("logs/extract_library/{night}.log"),
    benchmark:
        results("benchmarks/extract_library/{night}.tsv")
