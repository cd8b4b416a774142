# Predicted darks of every frame and channel of a night (whole active area), batched; on the
# GPU when the job has one. A physics-mode model runs its network only where it beat physics alone
# on validation by predict.margin (the predictions' `method` column says which, per frame).


rule predict:
    input:
        unpack(lambda wildcards: model_files()),
        shard=results("shards/{night}.h5"),
    output:
        predictions_output(),
    log:
        results("logs/predict/{night}.log"),
    benchmark:
        results("benchmarks/predict/{night}.tsv")
    conda:
        conda_env("predict")
    threads: job_threads("predict")
    resources:
        mem_mb=job_mem_mb("predict"),
        runtime=job_runtime("predict"),
        gpu=gpus("predict"),
    params:
        model=lambda wildcards, input: os.path.dirname(input.weights),
        batch_size=config["predict"]["batch_size"],
        margin=config["predict"]["margin"],
        device=config["device"],
    shell:
        "python3 -m deepdark predict --model {params.model:q} {input.shard:q} --out {output:q}"
        " --batch-size {params.batch_size:q} --margin {params.margin:q} --device {params.device:q} > {log:q} 2>&1"
