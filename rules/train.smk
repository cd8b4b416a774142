# Deep-Dark-Net trained on the library's darks (once; the physics preset on the fitted physics
# model): it stops when the validation night stops improving (model.epochs is a cap) and its card
# records where the network beats physics alone.
# Skipped when model.dir names an existing model directory.


if not config["model"]["dir"]:

    rule train:
        input:
            unpack(train_inputs),
        output:
            weights=results("model/model.safetensors"),
            card=results("model/model.json"),
        log:
            results("logs/train.log"),
        benchmark:
            results("benchmarks/train.tsv")
        conda:
            conda_env("train")
        threads: job_threads("train")
        resources:
            mem_mb=job_mem_mb("train"),
            runtime=job_runtime("train"),
            gpu=gpus("train"),
        params:
            out=lambda wildcards, output: os.path.dirname(output.weights),
            args=train_args(),
            physics=physics_args,
        shell:
            "python3 -m deepdark train {input.shards:q} --out {params.out:q} {params.physics:q} {params.args:q}"
            " > {log:q} 2>&1"
