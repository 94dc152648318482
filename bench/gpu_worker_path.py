"""`caprl` with one engine driven through the engine-worker path (`execute/multi.py`), which a real
run takes only with two engines or more: on a machine with a single GPU this is how `gpu_smoke.sh`
shows that a worker process started with its own `CUDA_VISIBLE_DEVICES` puts the model on that GPU.

    python bench/gpu_worker_path.py caption IMAGES -o OUT.parquet --engine transformers --gpus 0 ...
"""
import sys

import caprl_cli.execute.multi as multi
import caprl_cli.runner as runner


def forced(settings, placements, plan, samples, parts, stopper, keep_images=False):  # type: ignore[no-untyped-def]
    """`caption_with_engines`, but always in worker processes."""
    return multi.MultiEngineRun(settings, placements, plan, samples, parts, stopper, keep_images).run()


multi.caption_with_engines = forced
runner.caption_with_engines = forced
if __name__ == "__main__":  # spawned workers import this module too
    from caprl_cli.cli import main

    main(sys.argv[1:])
