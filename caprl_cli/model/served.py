"""Where an HTTP engine's processor files come from, when another machine (a `vllm serve`) runs the model.

caprl resizes every image onto the model's grid and renders CapRL's exact prompt itself, so it needs
the checkpoint's processor (image processor, tokenizer, chat template) even though the weights stay on
the server. `--model` names what the server serves: its id (`caprl`, as CapRL-3B's model card serves
it), its root, or a hub id. The processor is found, in this order:

1. `--processor ID|DIR`, as given;
2. the root the server reports, when it is a model folder on this machine (a server on this box);
3. a hub id or catalog entry that the root or the served id names: a root `owner/name`, or a root
   whose last component is a catalog name (`/PATH/CapRL-3B` is `internlm/CapRL-3B`).

Only when none applies is it a usage error, naming the server's id and root and `--processor`.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

from caprl_cli.errors import UsageError
from caprl_cli.model.catalog import find
from caprl_cli.model.source import canonical_model, local_model_folder, looks_like_path
from caprl_cli.settings import CaptionSettings
from caprl_cli.storage import redact


def with_processor(settings: CaptionSettings) -> CaptionSettings:
    """`settings` with `processor` filled in for `--engine openai` (asking the server what it serves);
    other engines load the processor from `--model` itself and are returned unchanged."""
    if settings.engine != "openai" or settings.base_url is None:
        return settings
    if settings.processor is not None:
        processor = canonical_model(settings.processor)
        local_model_folder(processor)  # a folder that is no model is refused here, in one line
        return replace(settings, processor=processor)
    from caprl_cli.engines.openai_client import ServerClient
    from caprl_cli.engines.openai_engine import START_TIMEOUT_S, api_key_of, served_entry

    client = ServerClient(settings.base_url, api_key_of(settings.api_key_env), START_TIMEOUT_S)
    entry = served_entry(client, settings.base_url, settings.model)
    processor = processor_of_entry(entry, settings.model)
    if processor is None:
        raise UsageError(
            f"cannot tell which model the server at {redact(settings.base_url)} runs (id {entry.get('id')!r}, "
            f"root {entry.get('root')!r}): pass --processor with its hub id or a local copy of its folder"
        )
    return replace(settings, processor=processor)


def processor_of_entry(entry: dict[str, Any], model: str) -> str | None:
    """The processor source for a served model's listing entry (see the module doc), None if unknown."""
    for name in (model, entry.get("root")):
        if isinstance(name, str) and _is_model_folder(name):
            return str(Path(name).expanduser().resolve())
    for name in (entry.get("root"), model, entry.get("id")):
        hub_id = hub_id_named_by(name)
        if hub_id is not None:
            return hub_id
    return None


def hub_id_named_by(name: object) -> str | None:
    """The hub id a served name or root stands for: an `owner/name` itself, or a catalog entry named
    by it or by its last path component (`/PATH/CapRL-3B`, `caprl-qwen3vl-4b`); None otherwise."""
    if not isinstance(name, str) or not name.strip():
        return None
    if not looks_like_path(name):
        return name
    for candidate in (name, PurePosixPath(name.rstrip("/")).name):
        entry = find(candidate)
        if entry is not None:
            return entry.hub_id
    return None


def _is_model_folder(name: str) -> bool:
    folder = Path(name).expanduser()
    return folder.is_dir() and (folder / "config.json").is_file()
