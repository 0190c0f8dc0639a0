"""Download a released weights file once, verified, atomically (CLIP and DINO weights share it).

The bytes go to a temporary file beside the target (``files.atomic_write``) and are
hashed while they stream; only a file whose sha256 is right is renamed into place, so
an interrupted, failed or corrupt download never leaves a file that looks complete.
"""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from reclip.clip.convert import CheckpointError
from reclip.files import atomic_write

__all__ = ["DOWNLOAD_ERRORS", "download_file", "sha256_of"]

# What a failed download raises: no network / DNS / HTTP errors (URLError), a dropped
# connection or a full disk (OSError), a stalled server (TimeoutError), a bad URL (ValueError).
DOWNLOAD_ERRORS = (urllib.error.URLError, OSError, TimeoutError, ValueError)


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, target: Path, *, sha256: str | None, desc: str, how_to: str) -> str:
    """Download ``url`` to ``target`` with a progress bar; returns the file's sha256.

    ``sha256``: the expected hash; a download with another hash raises ``CheckpointError``
    (naming the URL, both hashes and ``how_to``) and leaves nothing at ``target``. None:
    no published hash to check against (the caller records the returned one). Network
    and disk errors propagate as the ``DOWNLOAD_ERRORS`` types; ``target`` is then untouched.
    """
    got: list[str] = []

    def fetch(tmp: Path) -> None:
        digest = hashlib.sha256()
        # urllib.request.urlopen looked up at call time: tests replace it to go offline
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=60) as source:
            total = int(source.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=desc) as bar:
                while block := source.read(1 << 16):
                    out.write(block)
                    digest.update(block)
                    bar.update(len(block))
        if sha256 is not None and digest.hexdigest() != sha256:
            raise CheckpointError(
                f"downloaded {desc} from {url} has sha256 {digest.hexdigest()}, expected {sha256}; the download is "
                f"corrupt or the file changed. {how_to}"
            )
        got.append(digest.hexdigest())

    atomic_write(target, fetch)
    return got[0]
