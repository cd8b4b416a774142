# Predicted darks of every frame and channel of a night (whole active area), batched; on the
# GPU when the job has one.


rule predict:
    input:
        unpack(lambda wildcards: model_files()),
        shard=results("shards/{night}.h5"),
    output:
        results("predictions/{night}.h5"),
    params:
        model=lambda wildcards, input: os.path.dirname(input.weights),
        batch_size=config["predict"]["batch_size"],
        device=config["device"],
    log:
        results("logs/predict/{night}.log"),
    benchmark:
        results("benchmarks/predict/{night}.tsv")
    wildcard_constraints:
        night=r"[0-9]{8}",
    threads: config["threads"]["predict"]
    resources:
        mem_mb=6000,
        runtime=60,
        gpu=1 if config["gpu"] else 0,
    conda:
        env("model")
    shell:
        "python3 -m deepdark predict --model {params.model:q} {input.shard:q} --out {output:q}"
        " --batch-size {params.batch_size} --device {params.device} > {log} 2>&1"
