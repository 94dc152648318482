"""The data contract: one row per input image, the same columns in every output format."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from caprl_cli.errors import ErrorKind, format_error

STATUS_OK = "ok"
STATUS_ERROR = "error"
# A state-only row: the key's earlier rows no longer count (a placeholder a later read made obsolete).
# Never published: every output leaves a withdrawn key out.
STATUS_WITHDRAWN = "withdrawn"

SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string()),
        pa.field("caption", pa.string()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("finish_reason", pa.string()),
        pa.field("prompt_tokens", pa.int32()),
        pa.field("output_tokens", pa.int32()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("model", pa.string()),
        pa.field("meta", pa.string()),
    ]
)
COLUMNS: tuple[str, ...] = tuple(SCHEMA.names)

# With `--num-captions N` > 1, every row also holds all N captions of its image, in index order, with
# their finish reasons and output token counts; `caption`, `finish_reason` and `output_tokens` stay the
# first caption's. Outputs of runs with one caption per image do not have these columns, and a part
# written before they existed reads them as null.
CAPTIONS = "captions"
MULTI_CAPTION_FIELDS = (
    pa.field(CAPTIONS, pa.list_(pa.string())),
    pa.field("finish_reasons", pa.list_(pa.string())),
    pa.field("output_token_counts", pa.list_(pa.int32())),
)
MULTI_CAPTION_SCHEMA = pa.schema([*SCHEMA, *MULTI_CAPTION_FIELDS])


def output_schema(num_captions: int) -> pa.Schema:
    """The columns an output holds: the contract's, plus the list columns when N > 1."""
    return MULTI_CAPTION_SCHEMA if num_captions > 1 else SCHEMA


def output_columns(num_captions: int) -> tuple[str, ...]:
    """`output_schema`'s column names, in order."""
    return tuple(output_schema(num_captions).names)


# State parts (never published outputs) also remember each row's image signature, so a later run can
# tell the same image reached another way from a different image under the same key.
SIGNATURE = "signature"
# Parts always have the list columns (null with one caption per image), so that a part's columns do not
# depend on the run that wrote it.
PART_SCHEMA = pa.schema([*SCHEMA, pa.field(SIGNATURE, pa.string()), *MULTI_CAPTION_FIELDS])
# Parts of a run that publishes WebDataset shards with images also carry each image's original bytes
# until the shards are written; the compacted part records which shard holds each row.
IMAGE_COLUMNS = (pa.field("image", pa.binary()), pa.field("image_ext", pa.string()))
PART_SCHEMA_WITH_IMAGES = pa.schema([*PART_SCHEMA, *IMAGE_COLUMNS])
EXPORTED_SHARD = "wds_shard"

Row = dict[str, Any]


def caption_row(
    *,
    key: str,
    source: str,
    model: str,
    caption: str,
    finish_reason: str | None,
    prompt_tokens: int | None,
    output_tokens: int | None,
    width: int | None,
    height: int | None,
    meta: str | None = None,
    more: list[tuple[str, str | None, int | None]] | None = None,
) -> Row:
    """A captioned image; with several captions, `more` holds (caption, finish_reason, output_tokens)
    of the second and later ones, and the row gets the list columns of all of them."""
    return {
        "key": key,
        "source": source,
        "caption": caption,
        "status": STATUS_OK,
        "error": None,
        "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens,
        "width": width,
        "height": height,
        "model": model,
        "meta": meta,
    } | _caption_columns(caption, finish_reason, output_tokens, more)


def _caption_columns(
    caption: str, finish_reason: str | None, output_tokens: int | None, more: list[tuple[str, str | None, int | None]] | None
) -> Row:
    if not more:
        return {}
    every = [(caption, finish_reason, output_tokens), *more]
    return {
        CAPTIONS: [text for text, _, _ in every],
        "finish_reasons": [reason for _, reason, _ in every],
        "output_token_counts": [tokens for _, _, tokens in every],
    }


def all_output_tokens(row: Row) -> int:
    """Tokens generated for the row, over all its captions."""
    counts = row.get("output_token_counts")
    if counts:
        return sum(count or 0 for count in counts)
    return row.get("output_tokens") or 0


def error_row(
    *,
    key: str,
    source: str,
    model: str,
    kind: ErrorKind,
    message: str,
    width: int | None = None,
    height: int | None = None,
    meta: str | None = None,
) -> Row:
    """An image that could not be captioned; `error` says why as `<kind>: <message>`."""
    return {
        "key": key,
        "source": source,
        "caption": None,
        "status": STATUS_ERROR,
        "error": format_error(kind, message),
        "finish_reason": None,
        "prompt_tokens": None,
        "output_tokens": None,
        "width": width,
        "height": height,
        "model": model,
        "meta": meta,
    }


def withdrawal_row(*, key: str, source: str, model: str) -> Row:
    """The row that withdraws `key`: an error row that stood for a stream position, not a sample
    (`<shard>@<byte>`), once a later run read that stream without the failure."""
    return {
        "key": key,
        "source": source,
        "caption": None,
        "status": STATUS_WITHDRAWN,
        "error": None,
        "finish_reason": None,
        "prompt_tokens": None,
        "output_tokens": None,
        "width": None,
        "height": None,
        "model": model,
        "meta": None,
    }


def kind_of_error(error: str | None) -> str | None:
    """The `<kind>` part of an `error` value, for counting errors by kind."""
    return error.split(":", 1)[0] if error else None


def error_kind_of(row: Row) -> str | None:
    """The error kind of a row; None for a captioned one."""
    return kind_of_error(row.get("error"))
