# Deep-Dark-Net trained on the library's darks (once). Skipped when model.dir names an existing
# model directory.


if not config["model"]["dir"]:

    rule train:
        input:
            shards=lambda wildcards: expand(results("library/{night}.h5"), night=nights("library")),
        output:
            weights=results("model/model.safetensors"),
            card=results("model/model.json"),
        params:
            out=lambda wildcards, output: os.path.dirname(output.weights),
            args=train_args(),
        log:
            results("logs/train.log"),
        benchmark:
            results("benchmarks/train.tsv")
        threads: config["threads"]["train"]
        resources:
            mem_mb=8000,
            runtime=24 * 60,
            gpu=1 if config["gpu"] else 0,
        conda:
            env("model")
        shell:
            "python3 -m deepdark train {input.shards:q} --out {params.out:q} {params.args} > {log} 2>&1"
