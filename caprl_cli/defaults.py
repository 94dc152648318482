"""The defaults that more than one module needs, each written once.

A leaf module (it imports nothing of caprl's), so `--help`, the settings dataclass, the engines and
the writers can all read the same number without import cycles, and a default cannot drift between
`caprl caption`, `caprl merge` and the code paths that run without the CLI.
"""

from __future__ import annotations

DEFAULT_MODEL = "internlm/CapRL-3B"
DEFAULT_PROMPT = "Please describe this image in detail."
DEFAULT_MAX_TOKENS = 2048  # CapRL's own captioning limit
# Further tries of a remote read (or a server request) that failed transiently, with growing pauses.
DEFAULT_RETRIES = 3
DEFAULT_SHARD_SIZE = 10_000  # samples per WebDataset output shard
DEFAULT_ROWS_PER_FILE = 250_000  # rows per data file of a Parquet dataset folder
DEFAULT_CONCURRENCY = 32  # --engine openai: requests in flight at once
