"""Command line: parse options into settings, run, report. Nothing heavy is imported at module level,
so `caprl --help` answers at once on a machine where importing vLLM takes seconds. Exit codes are
listed in `exit_codes`; each error class carries its own.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from caprl_cli import __version__, exit_codes
from caprl_cli.errors import CaprlError, UsageError
from caprl_cli.execute.devices import parse_gpus
from caprl_cli.execute.stopping import StopNow
from caprl_cli.prepare.grid import DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS
from caprl_cli.settings import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MODEL,
    DEFAULT_PROMPT,
    DTYPES,
    ENGINES,
    OUTPUT_FORMATS,
    CaptionSettings,
    default_workers,
    output_format_for,
    parse_duration,
    validate_settings,
)
from caprl_cli.stdio import PipeSafeHandler, say, settle
from caprl_cli.storage import parse_storage_options, redact

log = logging.getLogger("caprl")


def env(name: str) -> str:
    """Every option can also be set as CAPRL_<OPTION>."""
    return f"CAPRL_{name.upper().replace('-', '_')}"


def option(*decls: str, **kwargs: Any) -> Any:
    """click.option with the CAPRL_<OPTION> environment variable wired in and shown in --help."""
    long_name = next(d for d in decls if d.startswith("--")).split("/")[0][2:]
    return click.option(*decls, envvar=env(long_name), show_envvar=True, **kwargs)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="caprl")
def cli() -> None:
    """Caption large image collections with CapRL models (offline vLLM) into Parquet, JSONL,
    WebDataset shards or sidecar .txt files."""


@cli.command()
@click.argument("inputs", nargs=-1, metavar="INPUT...")
@option("-o", "--output", default=None, help="Output: a .parquet or .jsonl file, a folder or 'out-%06d.tar' pattern of WebDataset shards; local or a URL (s3://...). With --format sidecar: the folder that keeps the state (default: the first input folder).")
@option("--format", "output_format", type=click.Choice(OUTPUT_FORMATS, case_sensitive=False), help="Output format; default: from the output's name.")
@option("--files-from", default=None, help="Also caption the paths or URLs listed in this file, one a line ('-': stdin).")
@option("--image-column", default=None, help="Manifest column naming each image; default: the first of image, image_path, path, url, file_name.")
@option("--image-root", default=None, help="Folder or URL that relative manifest paths are under; default: the manifest's folder.")
@option("--keep-meta/--no-keep-meta", default=True, show_default=True, help="Carry shard side members and manifest columns into the meta column.")
@option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE", help="fsspec option for remote inputs and outputs (repeatable), e.g. anon=true or endpoint_url=...")
@option("--shard-size", default=10_000, show_default=True, type=int, help="Samples per WebDataset output shard.")
@option("--images/--no-images", default=True, show_default=True, help="WebDataset output: include the original image bytes (--no-images: captions only).")
@option("--state-dir", default=None, type=click.Path(path_type=Path), help="Where the resume state lives; default: beside a local output, in ~/.cache/caprl for a remote one.")
@option("--model", default=DEFAULT_MODEL, show_default=True, help="Hub id or local model folder.")
@option("--revision", default=None, help="Hub revision (branch, tag or commit) of --model.")
@option("--prompt", default=DEFAULT_PROMPT, show_default=True, help="User instruction sent with each image.")
@option("--system-prompt", default=None, help="System turn; default: none, as CapRL captions.")
@option("--max-tokens", default=2048, show_default=True, type=int, help="Longest caption, in tokens.")
@option("--temperature", default=1.0, show_default=True, type=float, help="Sampling temperature (0: greedy).")
@option("--top-p", default=1.0, show_default=True, type=float, help="Nucleus sampling threshold.")
@option("--seed", default=0, show_default=True, type=int, help="Run seed; each image is sampled from (seed, key).")
@option("--min-pixels", default=DEFAULT_MIN_PIXELS, show_default=True, type=int, help="Smallest image area fed to the model.")
@option("--max-pixels", default=DEFAULT_MAX_PIXELS, show_default=True, type=int, help="Largest image area fed to the model (1280*28*28: 1280 visual tokens).")
@option("--max-image-pixels", default=DEFAULT_MAX_IMAGE_PIXELS, show_default=True, type=int, help="Refuse (never decode) images with more pixels than this.")
@option("--engine", default="vllm", show_default=True, type=click.Choice(ENGINES, case_sensitive=False), help="Inference engine.")
@option("--dtype", default="auto", show_default=True, type=click.Choice(DTYPES, case_sensitive=False), help="Model weights and activations dtype.")
@option("--max-model-len", default=None, type=int, help="Context length; default: one image at --max-pixels plus --max-tokens.")
@option("--gpu-memory-utilization", default=0.9, show_default=True, type=float, help="Share of GPU memory vLLM may use.")
@option("--batch-size", default=None, type=int, help="Images decoded together (vLLM: max concurrent sequences; transformers: generate batch, default 8).")
@option("--workers", default=None, type=int, help="Image preprocessing processes; default: CPU cores - 1, at most 8.")
@option("--limit", default=None, type=int, help="Caption at most N images this run (the first not yet done, in key order).")
@option("--overwrite", is_flag=True, default=False, help="Start over: forget what the output holds (checked first; the old output stays until the new one is published).")
@option("--replace-sidecars", is_flag=True, default=False, help="--format sidecar: replace existing .txt files that differ from the captions (default: keep them).")
@option("--retry-errors", is_flag=True, default=False, help="Caption error rows again and replace them.")
@option("--retries", default=3, show_default=True, type=int, help="Try a remote read that failed transiently (timeout, reset, 429/5xx) this many more times, with growing pauses; 0: never.")
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
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
@click.option("-v", "--verbose", count=True, help="More logging; -vv includes the engine's own logs.")
def caption(inputs: tuple[str, ...], quiet: bool, verbose: int, **options: Any) -> int:
    """Caption the images in INPUT into OUTPUT.

    INPUT is a folder (walked recursively, local or s3://..., images and .tar shards in it), an image
    file or URL, WebDataset shards (shard-{00000..00099}.tar, a::b, .tar.gz), a .jsonl/.parquet
    manifest, or @LIST (a file of paths or URLs).
    """
    started = time.monotonic()  # --max-runtime counts from here
    configure_logging(quiet, verbose)
    if not inputs and not options.get("files_from"):
        raise UsageError("missing argument INPUT (a folder, image, shard, manifest or @LIST) or --files-from")
    output: str | None = options.pop("output")
    output_format = output_format_for(output, options.pop("output_format"))
    storage_options = parse_storage_options(options.pop("storage_options"))
    workers = options.pop("workers")
    max_runtime = options.pop("max_runtime")
    gpus = options.pop("gpus")
    stall_timeout = options.pop("stall_timeout")
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
    validate_settings(settings)
    from caprl_cli.runner import run_caption
    from caprl_cli.execute.stopping import EXIT_CODE_OF, StopReason

    report = run_caption(settings, started=started)
    if not quiet:
        say(f"caprl: {describe_run(report)}")
    if report.stop_reason is None or (report.stop_reason is StopReason.DEADLINE and not report.plan.work_remains):
        return exit_codes.OK
    return EXIT_CODE_OF[report.stop_reason]


def describe_run(report: Any) -> str:
    """The closing line: what this run did, what the output holds, what is left."""
    run, plan = report.run, report.plan
    if plan.limit == 0:
        what = "nothing to do: --limit 0"
    elif not plan.handed_out:
        what = f"nothing to do: all {plan.inputs} images are already in {report.output}"
    elif run.images:
        what = (
            f"captioned {run.ok} of {run.images} images into {report.output} "
            f"in {report.elapsed_s:.1f}s ({report.images_per_s:.2f} images/s)"
        )
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
@click.option("--format", "output_format", type=click.Choice(OUTPUT_FORMATS, case_sensitive=False), help="The output's format, if its name does not tell.")
@click.option("--state-dir", default=None, type=click.Path(path_type=Path), help="The state folder, if the run was given one.")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE", help="fsspec option for remote inputs.")
@click.option("--files-from", default=None, help="Also count the paths or URLs listed in this file, one a line ('-': stdin), as caption was given.")
@click.option("--image-column", default=None, help="Manifest column naming each image, as caption was given.")
@click.option("--image-root", default=None, help="Folder or URL that relative manifest paths are under, as caption was given.")
@click.option("--keep-meta/--no-keep-meta", default=True, show_default=True, help="As caption was given.")
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
) -> int:
    """How far captioning into OUTPUT has come; with INPUTs (and the input options caption was given),
    how many images remain and an ETA."""
    import json

    from caprl_cli.inputs.resolve import InputOptions
    from caprl_cli.status import format_status, output_status

    reading = InputOptions(files_from=files_from, image_column=image_column, image_root=image_root, keep_meta=keep_meta)
    found = output_status(
        output, list(inputs), output_format, state_dir, parse_storage_options(storage_options), reading=reading
    )
    say(json.dumps(found, indent=2) if as_json else format_status(found), err=False)
    return exit_codes.FAILED if found["damaged_parts"] else exit_codes.OK


@cli.command()
@click.argument("output")
@click.option("--format", "output_format", type=click.Choice(OUTPUT_FORMATS, case_sensitive=False), help="The output's format, if its name does not tell.")
@click.option("--state-dir", default=None, type=click.Path(path_type=Path), help="The state folder, if the run was given one.")
@click.option("--storage-option", "storage_options", multiple=True, metavar="KEY=VALUE", help="fsspec option for a remote output.")
def repair(output: str, output_format: str | None, state_dir: Path | None, storage_options: tuple[str, ...]) -> int:
    """Rebuild a damaged state from the published OUTPUT: unreadable parts go to <state>/unreadable/,
    the rows OUTPUT holds become the oldest part, and rows committed since its last merge stay."""
    from caprl_cli.state.repair import repair_state

    report = repair_state(output, output_format, state_dir, parse_storage_options(storage_options))
    say(f"caprl: {report}")
    return exit_codes.OK


def configure_logging(quiet: bool, verbose: int) -> None:
    """caprl's own log lines on stderr; engine libraries stay quiet unless -vv."""
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    handler = PipeSafeHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("caprl: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False
    library_level = "INFO" if verbose >= 2 else "ERROR"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", library_level)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", library_level.lower())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if verbose < 2:
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")


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
