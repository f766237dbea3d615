"""The frame vectors stored beside a video index, for chamfer re-ranking::

frames/vectors.npy   (F, E) float32 frame vectors of every indexed video, row order of ids.jsonl
frames/offsets.npy   (N + 1,) int64: video r owns rows offsets[r]:offsets[r + 1]
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vitssl.index.store import MANIFEST_FILE, IndexFormatError, record_manifest
from vitssl.io import atomic_dir

FRAMES_DIR = "frames"
FRAME_VECTORS = "vectors.npy"
FRAME_OFFSETS = "offsets.npy"


def write_frames(directory: str | os.PathLike, frames: Sequence[np.ndarray]) -> Path:
    """Write the frame vectors of an index's videos (row order) into ``<directory>/frames`` atomically."""
    offsets = np.zeros(len(frames) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(f) for f in frames])
    width = frames[0].shape[1] if frames else 0
    target = Path(directory) / FRAMES_DIR
    with atomic_dir(target, overwrite=True) as tmp:
        out = np.lib.format.open_memmap(
            tmp / FRAME_VECTORS, mode="w+", dtype=np.float32, shape=(int(offsets[-1]), width)
        )
        for f, start in zip(frames, offsets[:-1]):
            out[start : start + len(f)] = f
        out.flush()
        del out
        np.save(tmp / FRAME_OFFSETS, offsets)
    return target


@dataclass
class FrameStore:
    """The frame vectors of an index folder, memory-mapped."""

    vectors: np.ndarray  # (F, E)
    offsets: np.ndarray  # (N + 1,)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> FrameStore:
        folder = Path(directory) / FRAMES_DIR
        try:
            vectors = np.load(folder / FRAME_VECTORS, mmap_mode="r")
            offsets = np.load(folder / FRAME_OFFSETS)
        except (OSError, ValueError) as err:
            raise IndexFormatError(
                f"{directory} has no readable frame vectors ({err}); rebuild it with `vitssl index build` for chamfer"
            ) from None
        if offsets.ndim != 1 or offsets[-1] != len(vectors):
            raise IndexFormatError(f"{folder}: offsets and vectors disagree; rebuild the index")
        return cls(vectors, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def get(self, row: int) -> np.ndarray:
        return np.asarray(self.vectors[self.offsets[row] : self.offsets[row + 1]])


def merge_video_frames(shard_dirs: Sequence[str | os.PathLike], out: str | os.PathLike) -> None:
    """After :func:`vitssl.index.shards.merge_shards`: merge the shards' frame vectors (shard order, as the index
    rows) and their ``video`` manifest entries into ``out``."""
    shards = []
    for d in shard_dirs:
        manifest = json.loads((Path(d) / MANIFEST_FILE).read_text(encoding="utf-8"))
        shards.append((manifest["shard"]["index"], Path(d), manifest))
    shards.sort(key=lambda s: s[0])
    frames: list[np.ndarray] = []
    for _, d, _ in shards:
        store = FrameStore.load(d)
        frames.extend(store.get(r) for r in range(len(store)))
    write_frames(out, frames)
    info = dict(shards[0][2]["video"])
    info["skipped"] = [p for _, _, m in shards for p in m["video"].get("skipped", [])]
    record_manifest(out, video=info)


__all__ = ["FRAMES_DIR", "FRAME_OFFSETS", "FRAME_VECTORS", "FrameStore", "merge_video_frames", "write_frames"]
