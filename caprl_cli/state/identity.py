"""Whether a sample met under a committed key is the image that key's row was made from.

A key names one image. When a run meets a key the state already holds, the committed row's source and
signature (a cheap fingerprint of the image, see `inputs.sample`) decide what the sample is:

- the same image: equal signatures, from any source (a moved or renamed input folder), or the same
  source when a signature is unknown (a URL signed again): nothing to caption;
- the same file changed in place: same source, other signature: captioned again, its row replaces;
- a different image: another source, and signatures that differ or are unknown: never skipped and
  never replacing the committed row, it becomes a `conflict` error row of its own, keyed
  `<key>@<hash of its source and signature>`, so it is written once and a later run finds it done.
"""

from __future__ import annotations

import hashlib
from enum import IntEnum

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from caprl_cli.errors import ErrorKind
from caprl_cli.inputs.sample import Sample
from caprl_cli.storage import redact


class Verdict(IntEnum):
    """What a sample under a committed key is, measured against the committed row."""

    SAME = 0  # the image the committed row was made from
    CHANGED = 1  # the same source with other content: caption again
    CONFLICT = 2  # a different image from another source: a conflict row


def judge(source: str, signature: str | None, committed_source: str | None, committed_signature: str | None) -> Verdict:
    """The verdict for one sample against the committed row of its key."""
    known = signature is not None and committed_signature is not None
    if known and signature == committed_signature:
        return Verdict.SAME
    if source == committed_source:
        return Verdict.CHANGED if known else Verdict.SAME
    return Verdict.CONFLICT


def judge_all(
    sources: pa.Array, signatures: pa.Array, committed_sources: pa.Array, committed_signatures: pa.Array
) -> np.ndarray:
    """`judge` for whole columns at once (listed inputs against their committed rows), as Verdict codes."""
    known = pc.and_(pc.is_valid(signatures), pc.is_valid(committed_signatures))
    equal = _numpy(pc.equal(signatures, committed_signatures))
    same_source = _numpy(pc.equal(sources, committed_sources))
    known_np = _numpy(known)
    verdicts = np.full(len(sources), int(Verdict.CONFLICT), dtype=np.int8)
    verdicts[same_source & known_np] = Verdict.CHANGED
    verdicts[same_source & ~known_np] = Verdict.SAME
    verdicts[equal] = Verdict.SAME
    return verdicts


def _numpy(mask: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean Arrow column as numpy, null counting as False."""
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


def conflict_key(key: str, source: str, signature: str | None) -> str:
    """The key of the conflict row for an image under `key`: the same image from the same place always
    gets the same one, so its conflict row is written once."""
    digest = hashlib.blake2b(f"{source}\0{signature or ''}".encode(), digest_size=4).hexdigest()
    return f"{key}@{digest}"


def conflict_sample(sample: Sample, committed_source: str | None) -> Sample:
    """The error sample that records `sample` as a different image under an already committed key."""
    return Sample(
        key=conflict_key(sample.key, sample.source, sample.signature),
        source=sample.source,
        meta=sample.meta,
        signature=sample.signature,
        error_kind=ErrorKind.CONFLICT,
        error_message=(
            f"key {sample.key!r} is already committed for the image from {redact(committed_source or '?')}; "
            f"{redact(sample.source)} is a different image under the same key and is not captioned "
            "(caption it into another output, or give it another name)"
        ),
    )
