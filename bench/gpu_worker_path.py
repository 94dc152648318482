"""`caprl` with one engine driven through the engine-worker path (the fleet over worker processes), which a real
run takes only with two engines or more: on a machine with a single GPU this is how `gpu_smoke.sh`
shows that a worker process started with its own `CUDA_VISIBLE_DEVICES` puts the model on that GPU.

    python bench/gpu_worker_path.py caption IMAGES -o OUT.parquet --engine transformers --gpus 0 ...
"""
import sys

import caprl_cli.execute.local as local

# Every engine counts as one whose core runs apart: so even a single engine goes to a worker process.
local.engine_core_apart = lambda *_: True
if __name__ == "__main__":  # spawned workers import this module too
    from caprl_cli.cli import main

    main(sys.argv[1:])
