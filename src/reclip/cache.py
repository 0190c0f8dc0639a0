"""Where reclip caches what it derives or downloads: ``$RECLIP_CACHE`` or ``~/.cache/reclip``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_folder(kind: str) -> Path:
    """The cache folder of one kind of data ("clip" weights, "text" embeddings, "toy" CLIPs)."""
    root = os.environ.get("RECLIP_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "reclip") / kind
