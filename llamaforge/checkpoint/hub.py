"""Hub repo ids (`meta-llama/Llama-2-7b-chat-hf`) resolved to a local snapshot through huggingface_hub.

huggingface_hub itself honours HF_TOKEN, HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE; this module only
picks which files to fetch and turns its exceptions into messages that say what to do.
"""

from __future__ import annotations

import re
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from llamaforge.errors import CheckpointError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Safetensors first; only a repo without them needs the much larger pickled or Meta files.
FIRST_PATTERNS = ["*.json", "tokenizer.model", "*.safetensors"]
FALLBACK_PATTERNS = ["*.json", "tokenizer.model", "pytorch_model*.bin", "consolidated.*.pth"]


def looks_like_repo_id(source: str) -> bool:
    return bool(REPO_ID.match(source))


def download(repo_id: str, revision: str | None = None) -> Path:
    """A local directory with the repo's config, tokenizer and weights (from the cache when offline)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=FIRST_PATTERNS))
        if not _has_weights(path):
            path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=FALLBACK_PATTERNS))
    except GatedRepoError:
        raise CheckpointError(
            f"{repo_id} is gated: accept its licence on https://huggingface.co/{repo_id}, then log in with "
            "`hf auth login` or set HF_TOKEN to a token of the account that accepted it"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"{repo_id} was not found on the hub (or it is private and HF_TOKEN is not set); check the name, "
            "or pass a local directory"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{repo_id} has no revision {revision!r}") from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo_id} is not in the local hub cache and the hub cannot be reached (offline, or "
            "HF_HUB_OFFLINE=1). Download it on a connected machine with `hf download "
            f"{repo_id}` and copy the cache (HF_HOME), or pass the path of a directory holding its files"
        ) from None
    except HfHubHTTPError as exc:
        raise CheckpointError(f"the hub refused {repo_id}: {exc}") from None
    if not _has_weights(path):
        raise CheckpointError(f"{repo_id} has no Llama weights (safetensors, pytorch_model*.bin or consolidated.*.pth)")
    return path


def _has_weights(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or any(path.glob("pytorch_model*.bin")) or any(
        path.glob("consolidated.*.pth"))


@contextmanager
def offline_when_unreachable(timeout: float = 3.0) -> Iterator[bool]:
    """Inside, huggingface_hub and datasets read only their caches when the hub cannot be reached now.

    Without it, `datasets.load_dataset` on a machine with no network retries for ~25 s (5 tries, backing
    off to 8 s) before it says so; one connection attempt tells the same in `timeout` seconds, and a
    cached dataset then loads at once. Yields whether the hub was reachable.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        yield False
        return
    endpoint = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        yield True
        return
    except OSError:
        pass
    datasets_config = sys.modules.get("datasets.config")
    saved = constants.HF_HUB_OFFLINE, getattr(datasets_config, "HF_HUB_OFFLINE", None)
    constants.HF_HUB_OFFLINE = True
    if datasets_config is not None:
        datasets_config.HF_HUB_OFFLINE = True
    try:
        yield False
    finally:
        constants.HF_HUB_OFFLINE = saved[0]
        if datasets_config is not None:
            datasets_config.HF_HUB_OFFLINE = saved[1]
