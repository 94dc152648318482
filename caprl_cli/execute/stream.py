"""The caption stream: prepared outcomes in, requests to the engine, rows out.

Written once, and run wherever an engine runs: in this process (`execute.local`), in an engine
worker process and in a Ray actor (both through `execute.host`). Each hands the rows to a `Sink`: the
run's committing `RowSink` here, or a link that carries them to the driver there. An image that failed
to prepare becomes its error row without reaching the engine; the others become caption rows (or
engine error rows), in the order the engine finishes them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from caprl_cli.engines.base import Caption, Engine, ImageRequest
from caprl_cli.errors import ErrorKind
from caprl_cli.outputs.rows import SIGNATURE, Row, caption_row, error_row
from caprl_cli.prepare.outcomes import Failed, Outcome, Prepared

# A last step between the stream and the engine (the engine hosts' test hooks); identity when unset.
RequestFilter = Callable[[Iterator[ImageRequest]], Iterator[ImageRequest]]


class Sink(Protocol):
    """Where a stream's rows go: may be called from the engine's own threads."""

    def add(self, row: Row) -> None: ...


def caption_stream(
    engine: Engine,
    outcomes: Iterable[Outcome],
    sink: Sink,
    model: str,
    keep_images: bool,
    should_stop: Callable[[], bool],
    request_filter: RequestFilter | None = None,
) -> None:
    """Caption the prepared images among `outcomes`, every row to `sink`; failed ones go straight to
    `sink`. Returns when the outcomes are exhausted and captioned, or soon after `should_stop()`."""
    waiting: dict[str, Prepared] = {}
    requests = image_requests(images_only(outcomes, sink, model, should_stop), waiting)
    if request_filter is not None:
        requests = request_filter(requests)
    for key, caption in engine.caption(requests, should_stop):
        sink.add(result_row(waiting.pop(key), caption, model, keep_images))


def images_only(
    outcomes: Iterable[Outcome], sink: Sink, model: str, should_stop: Callable[[], bool]
) -> Iterator[Prepared]:
    """Pass prepared images on to the engine and failed ones straight to the sink; stop when asked."""
    for outcome in outcomes:
        if should_stop():
            return
        if isinstance(outcome, Failed):
            sink.add(failed_row(outcome, model))
        else:
            yield outcome


def image_requests(images: Iterable[Prepared], waiting: dict[str, Prepared]) -> Iterator[ImageRequest]:
    """The engine's requests for `images`; each stays in `waiting` by key until its caption returns."""
    for item in images:
        waiting[item.sample.key] = item
        yield ImageRequest(item.sample.key, item.image, lossy_source=is_jpeg_name(item.sample.ext))


def is_jpeg_name(ext: str | None) -> bool:
    """Whether an image's extension says JPEG (the one lossy format an image is re-encoded as)."""
    return (ext or "").lower().lstrip(".") in ("jpg", "jpeg", "jpe", "jfif")


def failed_row(failed: Failed, model: str) -> Row:
    """The error row of an image that never reached the engine (with its signature, for the state)."""
    sample = failed.sample
    row = error_row(
        key=sample.key,
        source=sample.source,
        model=model,
        kind=failed.kind,
        message=failed.message,
        width=failed.width,
        height=failed.height,
        meta=sample.meta,
    )
    row[SIGNATURE] = sample.signature
    return row


def result_row(item: Prepared, caption: Caption, model: str, keep_image: bool = False) -> Row:
    """The row of an image the engine handled: a caption, or an engine error, with the image's signature
    for the state. With `keep_image`, a captioned row also carries the original bytes, for WebDataset
    shards that hold the images."""
    sample = item.sample
    if caption.error is not None:
        kind = ErrorKind.UNAVAILABLE if caption.transient else ErrorKind.ENGINE
        return failed_row(Failed(sample, kind, caption.error, item.width, item.height), model)
    row = caption_row(
        key=sample.key,
        source=sample.source,
        model=model,
        caption=caption.text or "",
        finish_reason=caption.finish_reason,
        prompt_tokens=caption.prompt_tokens,
        output_tokens=caption.output_tokens,
        width=item.width,
        height=item.height,
        meta=sample.meta,
        more=[(more.text or "", more.finish_reason, more.output_tokens) for more in caption.extra],
    )
    row[SIGNATURE] = sample.signature
    if keep_image:
        row["image"], row["image_ext"] = sample.data, sample.ext
    return row
