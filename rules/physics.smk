# The per-pixel physics model that a physics-preset model learns its residual on, fitted from
# the library one job per camera (cameras are independent: a cluster fits them on as many
# nodes), then joined into one file. The cameras are known once the library is extracted: the
# checkpoint lists them, and the per-camera jobs follow from its table.


if trains_physics_model():

    # Reading a table and copying HDF5 groups: seconds, not worth a cluster job.
    localrules:
        library_cameras,
        physics_merge,

    checkpoint library_cameras:
        input:
            shards=library_shards,
        output:
            results("library/cameras.csv"),
        log:
            results("logs/library_cameras.log"),
        conda:
            conda_env("library_cameras")
        shell:
            "python3 -m deepdark cameras {input.shards:q} --out {output:q} > {log:q} 2>&1"

    rule physics_fit:
        input:
            shards=library_shards,
            cameras=results("library/cameras.csv"),
        output:
            results("physics/{camera}.h5"),
        log:
            results("logs/physics_fit/{camera}.log"),
        benchmark:
            results("benchmarks/physics_fit/{camera}.tsv")
        conda:
            conda_env("physics_fit")
        threads: job_threads("physics_fit")
        resources:
            mem_mb=job_mem_mb("physics_fit"),
            runtime=job_runtime("physics_fit"),
        params:
            camera=lambda wildcards: camera_of_file(wildcards.camera),
            memory_mb=config["physics"]["memory_mb"],
        shell:
            "python3 -m deepdark physics-fit {input.shards:q} --cameras={params.camera:q} --out {output:q}"
            " --memory-mb {params.memory_mb} --threads {threads} > {log:q} 2>&1"

    rule physics_merge:
        input:
            physics_parts,
        output:
            results("physics.h5"),
        log:
            results("logs/physics_merge.log"),
        conda:
            conda_env("physics_merge")
        shell:
            "python3 -m deepdark physics-merge {input:q} --out {output:q} > {log:q} 2>&1"
