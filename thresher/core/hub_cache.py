"""Models named the way the Hugging Face Hub names them, found in the local cache, never downloaded.

``model.path: HuggingFaceTB/SmolLM2-135M-Instruct`` (optionally ``@revision``) is what a TRL user
writes. When no directory of that name exists, the id is looked up in the local Hugging Face cache
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, else ``~/.cache/huggingface/hub``) with
``huggingface_hub.snapshot_download(local_files_only=True)``: Thresher never reaches the network at
run time. A model that is not cached is one line saying where it was looked for and how to fetch it.
"""

from __future__ import annotations

import re
from pathlib import Path

from thresher.core.errors import ConfigError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def local_model_dir(path: str, field: str) -> Path:
    """``path`` as a directory: as given when it is one (or names no Hub id), else the cached
    snapshot of the Hub id it names. ``field`` names the config key in errors."""
    given = Path(path).expanduser()
    if given.exists() or not HUB_ID.match(path):
        return given
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo_id, _, revision = path.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError):
        raise ConfigError(
            [
                f"{field}: {path!r} is not a directory, and the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                f"does not hold it; fetch it once with `hf download {repo_id}` (Thresher does not download)"
            ]
        ) from None
