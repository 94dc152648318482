"""The options several commands share, each defined once (pip's `cmdoptions` style).

A shared option's name, help, default and environment variable live here and nowhere else, so
`caprl caption` and `caprl status` cannot drift apart: a cron job that sets `CAPRL_STATE_DIR` for its
run finds the same state when it asks for the status. Every option, shared or not, also reads
`CAPRL_<OPTION>` (`option`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from caprl_cli.defaults import DEFAULT_MODEL, DEFAULT_ROWS_PER_FILE, DEFAULT_SHARD_SIZE
from caprl_cli.model.source import canonical_model
from caprl_cli.settings import OUTPUT_FORMATS

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def env(name: str) -> str:
    """Every option can also be set as CAPRL_<OPTION>."""
    return f"CAPRL_{name.upper().replace('-', '_')}"


def option(*decls: str, **kwargs: Any) -> Decorator:
    """click.option with the CAPRL_<OPTION> environment variable wired in and shown in --help."""
    long_name = next(d for d in decls if d.startswith("--")).split("/")[0][2:]
    return click.option(*decls, envvar=env(long_name), show_envvar=True, **kwargs)


def output_format(formats: tuple[str, ...] = OUTPUT_FORMATS) -> Decorator:
    """`--format`: the output's format when its name does not tell (merge writes no sidecars)."""
    return option(
        "--format", "output_format", type=click.Choice(formats, case_sensitive=False),
        help="The output's format; default: from the output's name.",
    )


def storage_options() -> Decorator:
    return option(
        "--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE",
        help="fsspec option for remote inputs and outputs (repeatable), e.g. anon=true or endpoint_url=...",
    )


def state_dir() -> Decorator:
    return option(
        "--state-dir", default=None, type=click.Path(path_type=Path),
        help="Where the resume state lives; default: beside a local output, in ~/.cache/caprl for a remote one.",
    )


def model(help: str = "Hub id, local model folder, or a short name from `caprl models` (e.g. caprl-qwen3vl-4b).") -> Decorator:
    return option(
        "--model", default=DEFAULT_MODEL, show_default=True,
        callback=lambda ctx, param, value: canonical_model(value), help=help,
    )


def quiet() -> Decorator:
    return option("-q", "--quiet", is_flag=True, help="Print nothing on success: only caprl's warnings and errors.")


def verbose() -> Decorator:
    return option(
        "-v", "--verbose", count=True,
        help="More logging; -vv includes the engine libraries' own logs and warnings (vLLM, torch, transformers).",
    )


def files_from() -> Decorator:
    return option("--files-from", default=None, help="Also the paths or URLs listed in this file, one a line ('-': stdin).")


def image_column() -> Decorator:
    return option("--image-column", default=None, help="Manifest column naming each image; default: the first of image, image_path, path, url, file_name.")


def image_root() -> Decorator:
    return option("--image-root", default=None, help="Folder or URL that relative manifest paths are under; default: the manifest's folder.")


def keep_meta() -> Decorator:
    return option("--keep-meta/--no-keep-meta", default=True, show_default=True, help="Carry shard side members and manifest columns into the meta column.")


def num_shards() -> Decorator:
    return option("--num-shards", default=None, type=int, help="Split the work into N shares by a stable hash of each shard, image or manifest entry (with --shard-index); each share needs its own -o.")


def shard_index() -> Decorator:
    return option("--shard-index", default=None, type=int, help="Which share of --num-shards, 0..N-1 (e.g. $SLURM_ARRAY_TASK_ID).")


def shard_size() -> Decorator:
    return option("--shard-size", default=DEFAULT_SHARD_SIZE, show_default=True, type=int, help="Samples per WebDataset output shard.")


def rows_per_file() -> Decorator:
    return option("--rows-per-file", default=DEFAULT_ROWS_PER_FILE, show_default=True, type=int, help="Rows per file of a Parquet dataset folder (-o folder/ --format parquet): a run adds files of at most this many rows.")


def images() -> Decorator:
    return option("--images/--no-images", default=True, show_default=True, help="WebDataset output: include the original image bytes (--no-images: captions only).")
