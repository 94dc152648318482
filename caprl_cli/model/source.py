"""Find the model's files before anything loads: a local folder, or a hub id resolved to a snapshot.

Resolving first turns a typo or a missing folder into a one-line usage error instead of a traceback
from deep inside an engine, and gives provenance the exact revision that produced the captions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from caprl_cli.errors import ModelUnavailable, UsageError


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


def resolve_model(model: str, revision: str | None = None) -> ModelSource:
    """Locate `model` as a folder holding config.json, or as a hub snapshot (downloading if allowed)."""
    folder = local_model_folder(model)
    if folder is not None:
        return ModelSource(model_id=model, path=str(folder.resolve()), revision=revision)
    return _resolve_hub(model, revision)


def _resolve_hub(repo_id: str, revision: str | None) -> ModelSource:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, revision=revision)
    except Exception as exc:  # offline and not cached, unknown repo, no access...
        reason = " ".join(str(exc).split())[:300]
        raise ModelUnavailable(f"cannot get model {repo_id}: {reason}") from None
    return ModelSource(model_id=repo_id, path=path, revision=Path(path).name)
