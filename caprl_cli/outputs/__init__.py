"""Where captions end up: one module per format, each an `OutputTarget` built from the committed parts.

`table` (Parquet, JSONL), `parquet_dataset` (a folder of Parquet files that grows by adding files),
`webdataset` (tar shards), `sidecar` (.txt beside each image); `atomic` holds
the one way every file is written, `rows` the data contract, `provenance` what produced it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from caprl_cli.errors import UsageError
from caprl_cli.storage import local_path_of, require_backend

if TYPE_CHECKING:  # the state imports `rows` and `atomic` from here; targets import the state
    from caprl_cli.outputs.base import OutputOptions, OutputTarget


def open_target(location: str | None, inputs: list[str], options: OutputOptions) -> OutputTarget:
    """The target for `-o` and `--format`."""
    from caprl_cli.outputs.parquet_dataset import DatasetTarget
    from caprl_cli.outputs.sidecar import SidecarTarget
    from caprl_cli.outputs.table import FileTarget
    from caprl_cli.settings import is_dataset_folder
    from caprl_cli.outputs.webdataset import ShardTarget

    if options.output_format == "sidecar":
        folder = location or first_local_folder(inputs)
        return SidecarTarget(folder, options)
    if location is None:
        raise UsageError("missing option -o/--output (only --format sidecar writes without one)")
    require_backend(location)
    if options.output_format == "webdataset":
        return ShardTarget(location, options)
    if is_dataset_folder(location, options.output_format):
        return DatasetTarget(location, options)
    return FileTarget(location, options)


def first_local_folder(inputs: list[str]) -> str:
    """Sidecar runs keep their state in the first input folder unless -o names another folder."""
    for raw in inputs:
        path = local_path_of(raw)
        if path is not None and path.is_dir():
            return str(path)
        if path is not None and path.is_file():
            return str(path.parent)
    raise UsageError("--format sidecar writes .txt files beside local images: give a local folder or image")
