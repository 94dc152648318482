"""Command line: parse options into settings, run, report. Nothing heavy is imported at module level,
so `caprl --help` answers at once on a machine where importing vLLM takes seconds. Exit codes are
listed in `exit_codes`; each error class carries its own.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from caprl_cli import __version__, cmdoptions, exit_codes
from caprl_cli.cmdoptions import option
from caprl_cli.defaults import DEFAULT_CONCURRENCY, DEFAULT_MAX_TOKENS, DEFAULT_RETRIES
from caprl_cli.errors import CaprlError, ErrorKind, UsageError
from caprl_cli.execute.devices import parse_gpus
from caprl_cli.execute.stopping import StopNow
from caprl_cli.prepare.grid import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from caprl_cli.settings import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_REPEATS,
    DEFAULT_PROMPT,
    DTYPES,
    ENGINES,
    EXECUTORS,
    CaptionSettings,
    default_workers,
    output_for_share,
    output_format_for,
    parse_duration,
    validate_settings,
)
from caprl_cli.stdio import say, settle
from caprl_cli.storage import parse_storage_options, redact

log = logging.getLogger("caprl")


# `caprl merge` writes one table or shards: never sidecar files.
MERGE_FORMATS = ("parquet", "jsonl", "webdataset")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="caprl")
def cli() -> None:
    """Caption large image collections with CapRL models (offline vLLM) into Parquet, JSONL,
    WebDataset shards or sidecar .txt files."""


@cli.command()
@click.argument("inputs", nargs=-1, metavar="INPUT...")
@option("-o", "--output", default=None, help="Output: a .parquet or .jsonl file, a folder or 'out-%06d.tar' pattern of WebDataset shards, or with --format parquet a folder (ending in /) of Parquet files that grows by adding files; local or a URL (s3://...). With --format sidecar: the folder that keeps the state (default: the first input folder).")
@cmdoptions.output_format()
@cmdoptions.files_from()
@cmdoptions.image_column()
@cmdoptions.image_root()
@cmdoptions.keep_meta()
@cmdoptions.storage_options()
@cmdoptions.shard_size()
@cmdoptions.rows_per_file()
@cmdoptions.images()
@cmdoptions.state_dir()
@cmdoptions.model()
@option("--revision", default=None, help="Hub revision (branch, tag or commit) of --model.")
@option("--prompt", default=DEFAULT_PROMPT, show_default=True, help="User instruction sent with each image.")
@option("--system-prompt", default=None, help="System turn; default: none, as CapRL captions.")
@option("--max-tokens", default=DEFAULT_MAX_TOKENS, show_default=True, type=int, help="Longest caption, in tokens.")
@option("--temperature", default=1.0, show_default=True, type=float, help="Sampling temperature (0: greedy).")
@option("--top-p", default=1.0, show_default=True, type=float, help="Nucleus sampling threshold.")
@option("--seed", default=0, show_default=True, type=int, help="Run seed; each image is sampled from (seed, key).")
@option("--min-pixels", default=DEFAULT_MIN_PIXELS, show_default=True, type=int, help="Smallest image area fed to the model.")
@option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=int, help="Largest image area fed to the model (1280*28*28: 1280 visual tokens).")
@option("--max-image-pixels", default=DEFAULT_MAX_IMAGE_PIXELS, show_default=True, type=int, help="Refuse (never decode) images with more pixels than this.")
@option("--engine", default="vllm", show_default=True, type=click.Choice(ENGINES, case_sensitive=False), help="Inference engine (openai: an OpenAI-compatible server at --base-url, e.g. an existing vllm serve).")
@option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPES, case_sensitive=False), help="Model weights and activations dtype.")
@option("--max-model-len", default=None, type=int, help="Context length; default: one image at --max-pixels plus --max-tokens.")
@option("--gpu-memory-utilization", default=0.9, show_default=True, type=float, help="Share of GPU memory vLLM may use.")
@option("--batch-size", default=None, type=int, help="Images decoded together (vLLM: max concurrent sequences; transformers: generate batch, default 8).")
@option("--workers", default=None, type=int, help="Image preprocessing processes; default: CPU cores - 1, at most 8.")
@option("--limit", default=None, type=int, help="Caption at most N images this run (the first not yet done, in key order).")
@option("--overwrite", is_flag=True, default=False, help="Start over: forget what the output holds (checked first; the old output stays until the new one is published).")
@option("--replace-sidecars", is_flag=True, default=False, help="--format sidecar: replace existing .txt files that differ from the captions (default: keep them).")
@option("--retry-errors", is_flag=True, default=False, help="Caption error rows again and replace them.")
@option("--retries", default=DEFAULT_RETRIES, show_default=True, type=int, help="Try a remote read that failed transiently (timeout, reset, 429/5xx) this many more times, with growing pauses; 0: never.")
@option("--decode-timeout", default=120.0, show_default=True, type=float, help="Seconds one image may take to read and decode; a slower one is a timeout error row and its worker is replaced.")
@option("--max-image-bytes", default=DEFAULT_MAX_IMAGE_BYTES, show_default=True, type=int, help="Larger image files and URLs are too_large error rows, never read whole.")
@option("--gpus", default=None, help="GPUs to use, by position among the visible ones (0,1,3); default: all. One engine per GPU (or per --tensor-parallel-size GPUs).")
@option("--num-engines", default=None, type=int, help="Number of engines; default: one per GPU (or per group), one on the CPU without GPUs. 1: one engine in this process.")
@option("--tensor-parallel-size", default=1, show_default=True, type=int, help="GPUs per engine (vLLM), for captioners too large for one GPU.")
@option("--stall-timeout", default="600s", show_default=True, help="Kill and replace an engine worker that holds images but shows no progress for this long (90s, 10m).")
@option("--wait", is_flag=True, default=False, help="If another run holds the output, wait for it instead of exiting 75.")
@option("--max-runtime", default=None, help="Stop cleanly before this much time has passed (90s, 30m, 6h, 1h30m); exit 3 if work remains.")
@option("--flush-every", default=1000, show_default=True, type=int, help="Commit a part every N rows (and at least every 5 s).")
@option("--progress/--no-progress", default=True, show_default=True, help="Progress bar (log lines when stderr is not a terminal).")
@option("--dry-run", is_flag=True, default=False, help="Plan only: print images to caption, already done, errors to retry, shards left and an estimate of the time; load no model, write nothing.")
@cmdoptions.num_shards()
@cmdoptions.shard_index()
@option("--num-captions", default=1, show_default=True, type=int, help="Captions per image, each sampled with its own seed from (--seed, key, index); the first is in 'caption', all N in 'captions'.")
@option("--max-repeats", default=DEFAULT_MAX_REPEATS, show_default=True, type=int, help="Stop a caption whose last tokens repeat one block (up to 64 tokens) this many times, covering at least 64 tokens; its finish_reason is 'repetition'. 0: never stop early.")
@option("--executor", default="local", show_default=True, type=click.Choice(EXECUTORS, case_sensitive=False), help="Where the engines run: local (this machine), or ray (a Ray cluster: --ray-address, else a local one started for the run).")
@option("--ray-address", default=None, help="With --executor ray: the Ray cluster to run on (auto, or HOST:PORT of its head); default: start a local one for the run.")
@option("--base-url", default=None, help="--engine openai: the server's OpenAI API URL, e.g. http://gpu-host:8000/v1 (--model names what it serves).")
@option("--api-key-env", default=None, metavar="VAR", help="--engine openai: the environment variable holding the server's API key (never stored).")
@option("--concurrency", default=DEFAULT_CONCURRENCY, show_default=True, type=int, help="--engine openai: requests in flight at once.")
@option("--processor", default=None, metavar="ID|DIR", help="--engine openai: hub id or local folder of the model's processor files (grid and chat template); default: the root the server reports if it is a folder here, else the hub id or catalog entry its root or id names.")
@cmdoptions.quiet()
@cmdoptions.verbose()
def caption(inputs: tuple[str, ...], quiet: bool, verbose: int, **options: Any) -> int:
    """Caption the images in INPUT into OUTPUT.

    INPUT is a folder (walked recursively, local or s3://..., images and .tar shards in it), an image
    file or URL, WebDataset shards (shard-{00000..00099}.tar, a::b, .tar.gz), a .jsonl/.parquet
    manifest, or @LIST (a file of paths or URLs).
    """
    started = time.monotonic()  # --max-runtime counts from here
    configure_logging(quiet, verbose)
    if quiet:
        options["progress"] = False  # not even a bar in a terminal
    if not inputs and not options.get("files_from"):
        raise UsageError("missing argument INPUT (a folder, image, shard, manifest or @LIST) or --files-from")
    output = output_for_share(options.pop("output"), options["num_shards"], options["shard_index"])
    output_format = output_format_for(output, options.pop("output_format"))
    storage_options = parse_storage_options(options.pop("storage_options"))
    workers = options.pop("workers")
    max_runtime = options.pop("max_runtime")
    gpus = options.pop("gpus")
    stall_timeout = options.pop("stall_timeout")
    dry_run = options.pop("dry_run")
    settings = CaptionSettings(
        inputs=inputs,
        output=output,
        output_format=output_format,
        engine=options.pop("engine").lower(),
        dtype=options.pop("dtype").lower(),
        workers=default_workers() if workers is None else workers,
        max_runtime=None if max_runtime is None else parse_duration(max_runtime),
        storage_options=storage_options,
        gpus=None if gpus is None else parse_gpus(gpus),
        stall_timeout=parse_duration(stall_timeout),
        **options,
    )
    if dry_run:
        from caprl_cli.dry_run import format_dry_run, preview_run
        from caprl_cli.outputs.place import without_probes

        with without_probes():  # the same checks, and nothing created
            validate_settings(settings)
            say(format_dry_run(preview_run(settings)), err=False)
        return exit_codes.OK
    validate_settings(settings)
    from caprl_cli.model.served import with_processor
    from caprl_cli.runner import run_caption

    settings = with_processor(settings)

    report = run_caption(settings, started=started)
    if not quiet:
        share = f"share {settings.shard_index} of {settings.num_shards}: " if settings.num_shards is not None else ""
        say(f"caprl: {share}{describe_run(report)}")
    return exit_code_of(report)


def exit_code_of(report: Any) -> int:
    """The code a scheduler reads: a signal's own code; else 3 (partial) when a plain rerun would still
    do something (transient failures to retry, shards or images left); 0 only when nothing is left."""
    from caprl_cli.execute.stopping import EXIT_CODE_OF, StopReason

    if report.stop_reason is not None and report.stop_reason is not StopReason.DEADLINE:
        return EXIT_CODE_OF[report.stop_reason]
    return exit_codes.PARTIAL if rerun_would_work(report) else exit_codes.OK


def rerun_would_work(report: Any) -> bool:
    """Whether the same command run again would caption something: `unavailable` rows (a server or a
    store that failed transiently) are retried by a plain run, and so is every shard, manifest or image
    not finished, unless only `--limit` left them (the user asked for at most that many)."""
    plan = report.plan
    if report.totals.get("errors_by_kind", {}).get(ErrorKind.UNAVAILABLE.value):
        return True
    if plan.limit is not None and plan.handed_out >= plan.limit:
        return False
    return plan.work_remains


def describe_run(report: Any) -> str:
    """The closing line: what this run did, what the output holds, what is left."""
    run, plan = report.run, report.plan
    if plan.limit == 0:
        what = "nothing to do: --limit 0"
    elif not plan.handed_out:
        what = f"nothing to do: all {plan.inputs} images are already in {report.output}"
    elif run.images:
        what = f"captioned {run.ok} of {run.images} images into {report.output} in {report.elapsed_s:.1f}s"
        if run.ok:  # the rate of captions: error rows cost the engine nothing and would inflate it
            what += f" ({report.images_per_s * run.ok / run.images:.2f} images/s)"
    else:
        what = f"captioned no images in {report.elapsed_s:.1f}s"
    if run.errors:
        by_kind = ", ".join(f"{kind} {n}" for kind, n in sorted(run.errors_by_kind.items()))
        what += f"; {run.errors} error rows ({by_kind})"
    if plan.changed:
        what += f"; {plan.changed} changed since captioned (captioned again)"
    if plan.conflicts:
        noun = "key conflict" if plan.conflicts == 1 else "key conflicts"
        what += f"; {plan.conflicts} {noun}: a different image under a committed key (conflict rows)"
    totals = report.totals
    what += f"; the output holds {totals['images']} rows ({totals['error']} errors)"
    if report.stop_reason is not None:
        what += f"; stopped ({report.stop_reason.value})"
    left = []
    if plan.listed_remaining:
        left.append(f"{plan.listed_remaining} images")
    if plan.unfinished_streams:
        left.append(f"{plan.unfinished_streams} shards or manifests")
    if left:
        what += f"; {' and '.join(left)} remaining"
        if plan.limit != 0:  # with --limit 0 the same command would do nothing again
            what += ": run the same command again to continue"
    return what


@cli.command()
@click.argument("output")
@click.argument("inputs", nargs=-1, metavar="[INPUT]...")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@cmdoptions.output_format()
@cmdoptions.state_dir()
@cmdoptions.storage_options()
@cmdoptions.files_from()
@cmdoptions.image_column()
@cmdoptions.image_root()
@cmdoptions.keep_meta()
@cmdoptions.num_shards()
@cmdoptions.shard_index()
def status(
    output: str,
    inputs: tuple[str, ...],
    as_json: bool,
    output_format: str | None,
    state_dir: Path | None,
    storage_options: tuple[str, ...],
    files_from: str | None,
    image_column: str | None,
    image_root: str | None,
    keep_meta: bool,
    num_shards: int | None,
    shard_index: int | None,
) -> int:
    """How far captioning into OUTPUT has come; with INPUTs (and the input options caption was given),
    how many images remain and an ETA."""
    import json

    from caprl_cli.inputs.resolve import InputOptions
    from caprl_cli.outputs.locate import share_of_options
    from caprl_cli.status import format_status, output_status

    share = share_of_options(num_shards, shard_index)
    reading = InputOptions(files_from=files_from, image_column=image_column, image_root=image_root, keep_meta=keep_meta)
    found = output_status(
        output, list(inputs), output_format, state_dir, parse_storage_options(storage_options), reading=reading,
        share=share,
    )
    say(json.dumps(found, indent=2) if as_json else format_status(found), err=False)
    return exit_codes.FAILED if found["damaged_parts"] else exit_codes.OK


@cli.command()
@click.argument("output")
@cmdoptions.output_format()
@cmdoptions.state_dir()
@cmdoptions.storage_options()
@cmdoptions.num_shards()
@cmdoptions.shard_index()
def repair(
    output: str,
    output_format: str | None,
    state_dir: Path | None,
    storage_options: tuple[str, ...],
    num_shards: int | None,
    shard_index: int | None,
) -> int:
    """Rebuild a damaged state from the published OUTPUT: unreadable parts go to <state>/unreadable/,
    the rows OUTPUT holds become the oldest part, and rows committed since its last merge stay."""
    from caprl_cli.outputs.locate import share_of_options
    from caprl_cli.state.repair import repair_state

    share = share_of_options(num_shards, shard_index)
    report = repair_state(output, output_format, state_dir, parse_storage_options(storage_options), share=share)
    say(f"caprl: {report}")
    return exit_codes.OK


@cli.command()
@click.argument("output")
@click.option("-o", "--output", "folder", default=None, type=click.Path(path_type=Path), help="Folder for index.html and thumbs/; default: <OUTPUT>.gallery beside a local output.")
@click.option("--sample", default=200, show_default=True, type=int, help="Rows to show, drawn uniformly from the whole output.")
@click.option("--status", "status_filter", type=click.Choice(("ok", "error")), default=None, help="Sample only captioned (ok) or only error rows.")
@click.option("--seed", default=0, show_default=True, type=int, help="The same seed draws the same sample.")
@cmdoptions.output_format()
@cmdoptions.state_dir()
@cmdoptions.storage_options()
@cmdoptions.quiet()
@cmdoptions.verbose()
def gallery(
    output: str,
    folder: Path | None,
    sample: int,
    status_filter: str | None,
    seed: int,
    output_format: str | None,
    state_dir: Path | None,
    storage_options: tuple[str, ...],
    quiet: bool,
    verbose: int,
) -> int:
    """Write a static page (index.html + thumbnails, opens from disk) to review a sample of OUTPUT's
    captions beside their images, its errors by kind, caption lengths and the run's provenance."""
    from caprl_cli.gallery import build_gallery

    configure_logging(quiet, verbose)
    report = build_gallery(
        output,
        folder,
        sample=sample,
        status=status_filter,
        seed=seed,
        output_format=output_format.lower() if output_format else None,
        storage_options=parse_storage_options(storage_options),
        state_dir=state_dir,
    )
    if not quiet:
        say(
            f"caprl: wrote {report.folder / 'index.html'}: {report.sampled} of {report.rows} rows, "
            f"{report.thumbnails} thumbnails"
        )
    return exit_codes.OK


@cli.command()
@click.argument("outputs", nargs=-1, required=True, metavar="OUTPUT...")
@click.option("-o", "--output", "merged", required=True, help="The merged output: a .parquet or .jsonl file, a folder or 'out-%06d.tar' pattern of WebDataset shards, or with --format parquet a folder (ending in /) of Parquet files; local or a URL. Inputs may be Parquet dataset folders too.")
@cmdoptions.output_format(MERGE_FORMATS)
@click.option("--force", is_flag=True, default=False, help="Merge outputs captioned with other settings (model, prompt, sampling, pixel limits), or without provenance.")
@cmdoptions.storage_options()
@cmdoptions.shard_size()
@cmdoptions.images()
@cmdoptions.rows_per_file()
def merge(
    outputs: tuple[str, ...],
    merged: str,
    output_format: str | None,
    force: bool,
    storage_options: tuple[str, ...],
    shard_size: int,
    images: bool,
    rows_per_file: int,
) -> int:
    """Join finished outputs (the shares of --num-shards, say) into one: every key once. For a key in
    several, an ok row wins over an error row, otherwise the row of the output finished latest."""
    from caprl_cli.outputs.merging import merge_outputs

    configure_logging(False, 0)
    if shard_size < 1:
        raise UsageError("--shard-size must be at least 1")
    if rows_per_file < 1:
        raise UsageError("--rows-per-file must be at least 1")
    report = merge_outputs(
        list(outputs),
        merged,
        output_format=output_format.lower() if output_format else None,
        force=force,
        storage_options=parse_storage_options(storage_options),
        shard_size=shard_size,
        with_images=images,
        rows_per_file=rows_per_file,
    )
    say(f"caprl: {report}")
    return exit_codes.OK


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print the catalog as JSON.")
def models(as_json: bool) -> int:
    """List the CapRL checkpoints: hub id, architecture, grid, pixel limits and the GPU memory one engine
    needs (bf16 weights + 20% + 4 GiB for KV cache and activations). Their short names work as --model."""
    import json

    from caprl_cli.model.catalog import CATALOG, format_table

    if as_json:
        say(json.dumps([model.as_dict() for model in CATALOG], indent=2), err=False)
    else:
        say(format_table(), err=False)
    return exit_codes.OK


@cli.command()
@click.argument("inputs", nargs=-1, metavar="[INPUT]...")
@cmdoptions.model()
@click.option("-o", "--output", default=None, help="Output the run will write (local path or URL).")
@cmdoptions.storage_options()
@click.option("--min-free-gib", default=None, type=float, help="Free disk space the output (and its state) needs, in GiB; default 5.")
def doctor(inputs: tuple[str, ...], model: str, output: str | None, storage_options: tuple[str, ...], min_free_gib: float | None) -> int:
    """Check a machine before a long run: GPUs and their memory for the model, CUDA and driver, vLLM and
    transformers versions, the model's files, the output place (space, write access) and the fsspec
    backends for the URLs given. One line per check, with the fix for each problem; exit 0 only when
    nothing fails."""
    from caprl_cli.doctor import DoctorRequest, render, run_checks

    configure_logging(False, 0)
    if min_free_gib is not None and min_free_gib < 0:
        raise UsageError("--min-free-gib must not be negative")
    request = DoctorRequest(
        model=model,
        output=output,
        inputs=inputs,
        storage_options=parse_storage_options(storage_options),
        min_free_gib=min_free_gib,
    )
    results = run_checks(request)
    say(render(results), err=False)
    return exit_codes.OK if all(result.passed for result in results) else exit_codes.FAILED


def configure_logging(quiet: bool, verbose: int) -> None:
    """caprl's own log lines on stderr; engine libraries stay quiet unless -vv (see `verbosity`)."""
    from caprl_cli.verbosity import configure, level_of

    configure(level_of(quiet, verbose))


def fail(message: str, code: int) -> int:
    """One line on stderr, nothing else (and no credential a URL in it carried)."""
    say(f"caprl: error: {' '.join(redact(message).split())}")
    return code


class Terminated(BaseException):
    """SIGTERM arrived: unwind like Ctrl-C so the output's temporary file is removed."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> None:
    """Console entry point: map every way a run can end onto an exit code."""
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        code = cli.main(args=argv, prog_name="caprl", standalone_mode=False)
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:  # bad option, missing argument
        code = fail(exc.format_message(), exit_codes.USAGE)
    except CaprlError as exc:
        code = fail(str(exc), exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        code = fail("interrupted", exit_codes.SIGINT)
    except Terminated:
        code = fail("terminated", exit_codes.SIGTERM)
    except StopNow as exc:  # a signal or the deadline before captioning started: nothing to save
        code = fail(str(exc), exc.exit_code)
    except Exception as exc:
        if logging.getLogger("caprl").isEnabledFor(logging.DEBUG):
            raise
        code = fail(f"{exc}", exit_codes.FAILED)
    settle()  # a reader that went away (| head) must not change the exit code
    sys.exit(code if isinstance(code, int) else exit_codes.OK)
