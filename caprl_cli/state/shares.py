"""Node shares: `--num-shards N --shard-index I` takes one of N disjoint shares of the work.

No coordinator: every node computes the same split on its own. A work unit (a tar shard, or one
listed image or manifest entry) belongs to share `hash(identity) mod N`, where the hash is a fixed
digest of what names the unit, never its position. So the shares are disjoint, together complete,
and the same however the inputs are ordered, listed or globbed on each node. Units outside the share
are dropped while planning, before anything is opened.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from caprl_cli.inputs.sample import Sample
from caprl_cli.storage import is_url, url_identity

if TYPE_CHECKING:
    from caprl_cli.inputs.resolve import InputSet, ShardRef
    from caprl_cli.settings import CaptionSettings


def share_of(identity: str, count: int) -> int:
    """The share (0..count-1) a unit named `identity` belongs to: the first 8 bytes of its BLAKE2b
    digest, modulo `count`. A digest (unlike Python's salted `hash`) is the same on every node."""
    digest = hashlib.blake2b(identity.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % count


def shard_identity(shard: ShardRef) -> str:
    """What names a tar shard: its URL without credentials or signing parameters (a re-signed URL
    stays in its share), or the absolute path a local shard is recorded by."""
    return url_identity(shard.url) if is_url(shard.url) else shard.source


@dataclass(frozen=True)
class Share:
    """Share `index` of `count`."""

    index: int
    count: int

    @classmethod
    def of(cls, settings: CaptionSettings) -> Share | None:
        """The share the settings ask for; None for the whole of the work."""
        if settings.num_shards is None or settings.shard_index is None:
            return None
        return cls(settings.shard_index, settings.num_shards)

    def holds(self, identity: str) -> bool:
        return share_of(identity, self.count) == self.index

    def holds_sample(self, sample: Sample) -> bool:
        """Listed images and manifest entries are units of their own, named by their key."""
        return self.holds(sample.key)

    def holds_shard(self, shard: ShardRef) -> bool:
        return self.holds(shard_identity(shard))

    def of_inputs(self, inputs: InputSet) -> InputSet:
        """The listed samples and shards of this share (manifests are split entry by entry while they
        are read, see `stream_entries`)."""
        return replace(
            inputs,
            listed=[sample for sample in inputs.listed if self.holds_sample(sample)],
            shards=[shard for shard in inputs.shards if self.holds_shard(shard)],
        )

    def stream_entries(self, name: str, samples: Iterable[Sample]) -> Iterator[Sample]:
        """A manifest's entries of this share. The rows that stand for the manifest itself (could not
        open it, broke off at line n: keyed `<name>@<n>`) go to every share: each share read it."""
        for sample in samples:
            if self.holds_sample(sample) or (sample.error_kind is not None and sample.key.startswith(name + "@")):
                yield sample

    def describe(self) -> str:
        return f"share {self.index} of {self.count}"

    def record(self) -> dict[str, int]:
        """As provenance and the state's fingerprint keep it."""
        return {"index": self.index, "count": self.count}


def describe_share(record: dict | None) -> str | None:
    """`share I of N` for a recorded share (see `Share.record`); None for a whole run."""
    if not record:
        return None
    return f"share {record['index']} of {record['count']}"
