"""The typed settings of one captioning run: the single source of truth every stage reads.

The CLI only parses options into `CaptionSettings`; `validate_settings` turns every impossible value
into a `UsageError` before anything heavy (a model, a worker pool) is started.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from caprl_cli.defaults import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MODEL,
    DEFAULT_PROMPT,
    DEFAULT_RETRIES,
    DEFAULT_ROWS_PER_FILE,
    DEFAULT_SHARD_SIZE,
)
from caprl_cli.errors import UsageError
from caprl_cli.inputs.sample import DEFAULT_MAX_IMAGE_BYTES
from caprl_cli.prepare.grid import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from caprl_cli.model.source import local_model_folder
from caprl_cli.storage import local_path_of

# Pillow's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS), kept here so `--help` needs no Pillow.
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
# Repeats of one block that stop a looping caption (engines/repetition.py's rule), here for `--help`.
DEFAULT_MAX_REPEATS = 4
OUTPUT_FORMATS = ("parquet", "jsonl", "webdataset", "sidecar")
ENGINES = ("vllm", "transformers", "openai")
EXECUTORS = ("local", "ray")
DTYPES = ("auto", "bfloat16", "float16", "float32")
_FORMAT_BY_SUFFIX = {".parquet": "parquet", ".jsonl": "jsonl"}
_SECONDS_PER_UNIT = {"d": 86400, "h": 3600, "m": 60, "s": 1}


@dataclass(frozen=True)
class CaptionSettings:
    """Everything that decides what a run captions, how, and where the rows go."""

    inputs: tuple[str, ...]
    output: str | Path | None  # a file, a folder or shard pattern (webdataset), a URL; None for sidecar
    output_format: str
    model: str = DEFAULT_MODEL
    revision: str | None = None
    prompt: str = DEFAULT_PROMPT
    system_prompt: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    engine: str = "vllm"
    dtype: str = "auto"
    max_model_len: int | None = None
    gpu_memory_utilization: float = 0.9
    batch_size: int | None = None
    workers: int = field(default_factory=lambda: default_workers())
    limit: int | None = None
    overwrite: bool = False  # start over: forget the state (never clobbers sidecar .txt files)
    replace_sidecars: bool = False  # sidecar: replace existing .txt files that differ from the caption
    retry_errors: bool = False
    retries: int = DEFAULT_RETRIES  # further tries of a remote read that failed transiently (not fingerprinted)
    decode_timeout: float = 120.0  # seconds one image may take to read and decode (not fingerprinted)
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES  # larger image files and URLs are too_large, never read whole
    wait: bool = False
    max_runtime: float | None = None
    flush_every: int = 1000
    progress: bool = True
    files_from: str | None = None
    image_column: str | None = None
    image_root: str | None = None
    keep_meta: bool = True
    storage_options: dict[str, Any] = field(default_factory=dict)
    shard_size: int = DEFAULT_SHARD_SIZE
    images: bool = True
    state_dir: Path | None = None
    # Engines (see execute/devices.py): which GPUs, how many engines, GPUs per engine; a worker that
    # shows no progress for stall_timeout seconds is killed and replaced. Not fingerprinted.
    gpus: tuple[int, ...] | None = None
    num_engines: int | None = None
    tensor_parallel_size: int = 1
    stall_timeout: float = 600.0
    # Node shares (see state/shares.py): this run takes share `shard_index` of `num_shards`, chosen by a
    # stable hash of each work unit; both None for the whole of the work. Fingerprinted.
    num_shards: int | None = None
    shard_index: int | None = None
    # Captions per image, each from its own seed (see engines/seeding.py). Fingerprinted.
    num_captions: int = 1
    # Stop a caption once its tail is this many repeats of one block (engines/repetition.py); 0: never.
    # Fingerprinted.
    max_repeats: int = DEFAULT_MAX_REPEATS
    # Parquet dataset folder (`-o folder/ --format parquet`): rows per data file at most. Not fingerprinted.
    rows_per_file: int = DEFAULT_ROWS_PER_FILE
    # Where the engines run (see execute/ray_transport.py): "local" (this machine) or "ray", on the Ray
    # cluster at ray_address or on a local one the run starts. Not fingerprinted.
    executor: str = "local"
    ray_address: str | None = None
    # --engine openai: the OpenAI-compatible server (its URL up to /v1), the environment variable that
    # holds its API key (the key itself is never stored), and requests in flight. Not fingerprinted.
    base_url: str | None = None
    api_key_env: str | None = None
    concurrency: int = DEFAULT_CONCURRENCY
    # --engine openai: where the processor files (grid, chat template) come from: a hub id or local folder;
    # None until resolved from the server's listing (model/served.py). Recorded in provenance.
    processor: str | None = None

    @property
    def output_location(self) -> str | None:
        return None if self.output is None else str(self.output)


def default_workers() -> int:
    """Preprocessing processes: enough to keep one engine fed, leaving a core for the engine."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def output_format_for(output: str | Path | None, requested: str | None) -> str:
    """`--format` if given, else the output's name: `.parquet`, `.jsonl`, and for WebDataset shards a
    pattern (`out-%06d.tar`) or a folder (an existing one, or a name ending in `/`).

    A `--format` the name contradicts is refused, so one name never holds two formats: a `.parquet`
    or `.jsonl` name holds that format, a shard pattern holds shards, and a trailing `/` names a folder.
    """
    if output is None:
        if requested:
            return requested.lower()
        raise UsageError("missing option -o/--output (only --format sidecar writes without one)")
    text = str(output)
    is_folder = text.endswith("/")
    name = text.rstrip("/").rsplit("/", 1)[-1]
    suffix = os.path.splitext(name)[1].lower()
    by_suffix = _FORMAT_BY_SUFFIX.get(suffix)
    is_pattern = suffix == ".tar" and "%" in name
    if requested:
        requested = requested.lower()
        names = None
        if is_folder and requested == "jsonl":
            names = "a folder (it ends in /); only --format parquet (a dataset folder) or webdataset write one"
        elif is_pattern and requested != "webdataset":
            names = "WebDataset shards"
        elif by_suffix and not is_folder and requested != by_suffix:
            names = f"a {by_suffix} file"
        if names:
            raise UsageError(f"--format {requested} contradicts the output {text!r}, which names {names}")
        return requested
    if by_suffix and is_folder:
        raise UsageError(
            f"the output {text!r} ends in / (a folder) but its name says {by_suffix}: drop the / for a "
            f"{by_suffix} file, or pass --format parquet for a Parquet dataset folder or --format webdataset "
            "for a folder of shards"
        )
    found = by_suffix
    if found is None and (is_pattern or is_folder or Path(output).is_dir()):
        found = "webdataset"
    if found is None:
        raise UsageError(
            f"cannot tell the output format from {name!r}: use a .parquet or .jsonl name, "
            f"a folder (ending in /) or pattern (out-%06d.tar) of shards, or --format {'|'.join(OUTPUT_FORMATS)}"
        )
    return found


def is_dataset_folder(output: str, output_format: str) -> bool:
    """Whether `-o output --format parquet` names a Parquet dataset folder rather than one Parquet file:
    only a name ending in `/` does, so a typo never turns a file into a folder (an existing folder named
    without the `/` is refused as an output file). A folder without `--format` stays WebDataset."""
    return output_format == "parquet" and output.endswith("/")


def validate_settings(settings: CaptionSettings) -> None:
    """Refuse values no run can use, with a message naming the option."""
    checks: list[tuple[bool, str]] = [
        (settings.max_tokens >= 1, "--max-tokens must be at least 1"),
        (settings.temperature >= 0, "--temperature must not be negative"),
        (0 < settings.top_p <= 1, "--top-p must be in (0, 1]"),
        (settings.min_pixels >= 1, "--min-pixels must be at least 1"),
        (settings.max_pixels >= settings.min_pixels, "--max-pixels must not be below --min-pixels"),
        (settings.max_image_pixels >= 1, "--max-image-pixels must be at least 1"),
        (0 < settings.gpu_memory_utilization <= 1, "--gpu-memory-utilization must be in (0, 1]"),
        (settings.workers >= 0, "--workers must not be negative"),
        (settings.limit is None or settings.limit >= 0, "--limit must not be negative"),
        (settings.batch_size is None or settings.batch_size >= 1, "--batch-size must be at least 1"),
        (settings.max_model_len is None or settings.max_model_len >= 1, "--max-model-len must be at least 1"),
        (settings.seed >= 0, "--seed must not be negative"),
        (settings.flush_every >= 1, "--flush-every must be at least 1"),
        (settings.retries >= 0, "--retries must not be negative"),
        (settings.decode_timeout > 0, "--decode-timeout must be positive"),
        (settings.max_image_bytes >= 1, "--max-image-bytes must be at least 1"),
        (settings.shard_size >= 1, "--shard-size must be at least 1"),
        (settings.output is not None or settings.output_format == "sidecar", "missing option -o/--output"),
        (settings.max_runtime is None or settings.max_runtime > 0, "--max-runtime must be positive"),
        (bool(settings.prompt.strip()), "--prompt must not be empty"),
        (settings.output_format in OUTPUT_FORMATS, f"--format must be one of {', '.join(OUTPUT_FORMATS)}"),
        (settings.engine in ENGINES, f"--engine must be one of {', '.join(ENGINES)}"),
        (settings.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}"),
        (settings.num_engines is None or settings.num_engines >= 1, "--num-engines must be at least 1"),
        (settings.tensor_parallel_size >= 1, "--tensor-parallel-size must be at least 1"),
        (
            settings.tensor_parallel_size == 1 or settings.engine == "vllm",
            "--tensor-parallel-size applies to --engine vllm only",
        ),
        (settings.stall_timeout > 0, "--stall-timeout must be positive"),
        (settings.rows_per_file >= 1, "--rows-per-file must be at least 1"),
        (settings.num_captions >= 1, "--num-captions must be at least 1"),
        (settings.max_repeats == 0 or settings.max_repeats >= 2, "--max-repeats must be 0 (off) or at least 2"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    validate_share(settings.num_shards, settings.shard_index)
    validate_executor(settings)
    validate_server(settings)
    if settings.engine == "vllm" and settings.executor == "local":  # a Ray cluster's nodes have their own
        from caprl_cli.engines.vllm_support import VLLM_FIX, installed_vllm, untested_vllm

        problem = untested_vllm(installed_vllm())
        if problem is not None:
            raise UsageError(f"{problem}: {VLLM_FIX}")
    if settings.engine != "openai":  # a server's --model may be its id or a root on another machine
        local_model_folder(settings.model)
    location = settings.output_location
    local = local_path_of(location) if location is not None else None
    dataset = location is not None and is_dataset_folder(location, settings.output_format)
    if local is not None and settings.output_format in ("parquet", "jsonl") and not dataset:
        check_output_writable(local)
    if settings.output_format != "webdataset" and not settings.images:
        raise UsageError("--no-images only applies to --format webdataset")
    if settings.output_format != "sidecar" and settings.replace_sidecars:
        raise UsageError("--replace-sidecars only applies to --format sidecar")


def validate_server(settings: CaptionSettings) -> None:
    """`--engine openai` needs `--base-url` (and only it takes one); the server owns the GPUs."""
    if settings.engine != "openai":
        for given, option in (
            (settings.base_url, "--base-url"),
            (settings.api_key_env, "--api-key-env"),
            (settings.processor, "--processor"),
        ):
            if given is not None:
                raise UsageError(f"{option} applies to --engine openai only")
        return
    if not settings.base_url:
        raise UsageError("--engine openai needs --base-url (the server's URL, e.g. http://gpu-host:8000/v1)")
    if not settings.base_url.startswith(("http://", "https://")):
        raise UsageError(f"--base-url must be an http:// or https:// URL, not {settings.base_url!r}")
    if settings.concurrency < 1:
        raise UsageError("--concurrency must be at least 1")
    if settings.api_key_env is not None and not os.environ.get(settings.api_key_env):
        raise UsageError(f"--api-key-env {settings.api_key_env}: that environment variable is not set")
    if settings.gpus is not None or (settings.num_engines or 1) > 1:
        raise UsageError("--gpus and --num-engines do not apply to --engine openai: the server runs the model")
    if settings.executor != "local":
        raise UsageError("--executor ray does not apply to --engine openai: the server runs the model")


def validate_executor(settings: CaptionSettings) -> None:
    """`--executor ray` needs Ray, and places engines itself; `--ray-address` means nothing without it."""
    if settings.executor not in EXECUTORS:
        raise UsageError(f"--executor must be one of {', '.join(EXECUTORS)}")
    if settings.executor != "ray":
        if settings.ray_address is not None:
            raise UsageError("--ray-address applies to --executor ray only")
        return
    if settings.gpus is not None:
        raise UsageError("--gpus picks GPUs of this machine; with --executor ray, Ray places the engines (use --num-engines)")
    from caprl_cli.execute.ray_cluster import require_ray

    require_ray()


def validate_share(num_shards: int | None, shard_index: int | None) -> None:
    """`--num-shards N --shard-index I` come together, with 0 <= I < N."""
    if (num_shards is None) != (shard_index is None):
        raise UsageError("--num-shards and --shard-index go together: give both or neither")
    if num_shards is None or shard_index is None:
        return
    if num_shards < 1:
        raise UsageError("--num-shards must be at least 1")
    if not 0 <= shard_index < num_shards:
        raise UsageError(f"--shard-index must be in 0..{num_shards - 1} (--num-shards {num_shards})")


SHARE_PLACEHOLDER = "{shard_index}"


def output_for_share(output: str | None, num_shards: int | None, shard_index: int | None) -> str | None:
    """`-o` with `{shard_index}` filled in, so one command line (an array job's) gives every share its
    own output: `caps-{shard_index}.parquet` -> `caps-3.parquet`."""
    if output is None or SHARE_PLACEHOLDER not in output:
        return output
    validate_share(num_shards, shard_index)
    if shard_index is None:
        raise UsageError(f"-o {output!r} names {SHARE_PLACEHOLDER} but no --num-shards/--shard-index was given")
    return output.replace(SHARE_PLACEHOLDER, str(shard_index))


def parse_duration(text: str) -> float:
    """Seconds in `90`, `90s`, `30m`, `6h`, `1h30m` or `2d`."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    if not re.fullmatch(r"(?:\d+(?:\.\d+)?\s*[dhms]\s*)+", text):
        raise UsageError(f"cannot read duration {text!r}: use e.g. 90s, 30m, 6h or 1h30m")
    pairs = re.findall(r"(\d+(?:\.\d+)?)\s*([dhms])", text)
    return sum(float(value) * _SECONDS_PER_UNIT[unit] for value, unit in pairs)


def check_output_writable(output: Path) -> None:
    """Fail early, before a model loads, if the output cannot be written where asked."""
    if output.is_dir():
        raise UsageError(
            f"output {output} is a directory; give a file name ending in .parquet or .jsonl, "
            "or end it with / and pass --format parquet for a Parquet dataset folder"
        )
    parent = output.parent
    from caprl_cli.outputs.place import probes_allowed

    if not probes_allowed():  # a dry run: the output place checks judge the folder without writing
        return
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".caprl-probe-"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write to output directory {parent}: {exc.strerror or exc}") from None
