"""Resolve "a local directory or a Hugging Face hub id" to a local directory."""
from __future__ import annotations

import os
from pathlib import Path


class CheckpointNotFound(FileNotFoundError):
    pass


def resolve_dir(path_or_hub_id: str | os.PathLike, allow_patterns: list[str]) -> Path:
    """A local directory is returned as is; anything else is treated as a hub id and fetched with
    `huggingface_hub.snapshot_download` (only `allow_patterns`), honouring HF_HUB_OFFLINE and the local cache."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    text = str(path_or_hub_id)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise CheckpointNotFound(
            f"{text!r} is neither a local directory nor a hub id of the form 'owner/name'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=allow_patterns))
    except Exception as e:  # the hub raises many types (offline, 404, connection, gated); one message serves all
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        why = "HF_HUB_OFFLINE is set and the files are not in the local cache" if offline else \
            "the Hugging Face hub could not be reached or does not have it"
        raise CheckpointNotFound(
            f"could not get {text!r}: {why} ({type(e).__name__}: {e}). "
            f"Download it on a machine with internet (e.g. `huggingface-cli download {text}`) and pass the local "
            f"directory holding config.json and *.safetensors instead.") from None
