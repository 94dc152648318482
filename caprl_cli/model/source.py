"""Find the model's files before anything loads: a local folder, or a hub id resolved to a snapshot.

Resolving first turns a typo or a missing folder into a one-line usage error instead of a traceback
from deep inside an engine, and gives provenance the exact revision that produced the captions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from caprl_cli.errors import UsageError


@dataclass(frozen=True)
class ModelSource:
    """Where the weights are (`path`), what the user called them (`model_id`) and which revision."""

    model_id: str
    path: str
    revision: str | None


def looks_like_path(model: str) -> bool:
    """A hub id is exactly `owner/name`; anything else with a path shape is meant as a folder."""
    if model.startswith(("/", ".", "~")) or "\\" in model:
        return True
    return model.count("/") != 1


def canonical_model(model: str) -> str:
    """The hub id a catalog short name stands for (`caprl-qwen3vl-4b`, any case), else `model` as given.

    An existing folder of that name wins, so a local checkout called `caprl-3b` is still a folder.
    Resolving this early puts the hub id, not the nickname, into rows, provenance and the run state.
    """
    from caprl_cli.model.catalog import find

    if Path(model).expanduser().exists():
        return model
    entry = find(model)
    return entry.hub_id if entry is not None and "/" not in model else model


def local_model_folder(model: str) -> Path | None:
    """The folder `model` names, None for a hub id; a folder that cannot be a model is a UsageError.

    Cheap (no download, no import), so it runs before anything else in a run.
    """
    folder = Path(model).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise UsageError(f"model folder {model} has no config.json")
        return folder
    if looks_like_path(model) or folder.exists():
        raise UsageError(f"model folder {model} does not exist")
    return None


# Weight files, left out of a hub download when another machine runs the model (--engine openai).
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "*.h5", "*.msgpack", "*.onnx")


def resolve_model(model: str, revision: str | None = None, weights: bool = True) -> ModelSource:
    """Locate `model` as a folder holding config.json, or as a hub snapshot (downloading if allowed).
    Without `weights`, a hub snapshot holds only the config, tokenizer and processor files."""
    model = canonical_model(model)
    folder = local_model_folder(model)
    if folder is not None:
        return ModelSource(model_id=model, path=str(folder.resolve()), revision=revision)
    return _resolve_hub(model, revision, weights)


def _resolve_hub(repo_id: str, revision: str | None, weights: bool = True) -> ModelSource:
    from caprl_cli.model.download import download_snapshot

    path = download_snapshot(repo_id, revision, None if weights else list(WEIGHT_PATTERNS))
    return ModelSource(model_id=repo_id, path=path, revision=Path(path).name)
