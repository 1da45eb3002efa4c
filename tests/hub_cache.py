"""A local Hugging Face hub cache, laid out as huggingface_hub lays it out, so hub ids resolve with no network.

    <cache>/models--<org>--<name>/blobs/<etag>                 file contents (sha256 for LFS files, git sha1 else)
    <cache>/models--<org>--<name>/snapshots/<commit>/<file>    relative symlink -> ../../blobs/<etag>
    <cache>/models--<org>--<name>/refs/<revision>              the commit hash

The cache is `$HF_HOME/hub` (huggingface_hub's default for HF_HOME) or any `cache_dir=`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

LFS_SUFFIXES = (".safetensors", ".bin", ".model")


def _etag(data: bytes, lfs: bool) -> str:
    if lfs:
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id


def add_snapshot(cache: Path, repo_id: str, folder: Path, revision: str = "main") -> str:
    """Put `folder`'s files in `cache` as the snapshot of `repo_id` at `revision`; returns the commit hash."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in folder.iterdir() if p.is_file())
    digest = hashlib.sha1(repo_id.encode())
    for path in files:
        digest.update(path.name.encode() + hashlib.sha1(path.read_bytes()).digest())
    commit = digest.hexdigest()
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for path in files:
        data = path.read_bytes()
        etag = _etag(data, path.suffix in LFS_SUFFIXES)
        (repo / "blobs" / etag).write_bytes(data)
        link = snapshot / path.name
        if link.is_symlink():
            link.unlink()
        link.symlink_to(os.path.join("..", "..", "blobs", etag))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit
