"""Where faiss runs an index: the GPU decision and the copies between CPU and GPU.

With a GPU build of faiss that sees a GPU (``vitssl._faiss.gpu_available()``), IVF-Flat indexes are trained
and filled on the GPU and Flat / IVF-Flat indexes searched there; other index types, k or nprobe above 2048,
and ``use_gpu=False`` (every builder and :func:`vitssl.index.search.search` take it) stay on the CPU. What is
returned and written is always a CPU index, so index directories do not depend on where they were built. GPU
k-means may pick slightly different centroids than CPU k-means: build the train step and a single build on the
same kind of device to keep them identical.
"""

from __future__ import annotations

import functools
from typing import Any

from vitssl._faiss import faiss, gpu_available

# faiss GPU indexes return at most this many neighbours and visit at most this many IVF lists per query.
_GPU_MAX_K = 2048


def gpu_capable(index: Any) -> bool:
    """Whether faiss can run ``index`` on a GPU and copy it back unchanged: Flat, or IVF-Flat over a flat
    coarse quantizer, also inside an IDMap. (faiss has GPU IVF-PQ / IVF-SQ too, with their own limits on code
    sizes; other coarse quantizers, e.g. HNSW, would come back flat.)"""
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexIDMap):  # IndexIDMap2 derives from it
        inner = faiss.downcast_index(inner.index)
    if type(inner) in (faiss.IndexFlat, faiss.IndexFlatIP, faiss.IndexFlatL2):
        return True
    return type(inner) is faiss.IndexIVFFlat and isinstance(faiss.downcast_index(inner.quantizer), faiss.IndexFlat)


def decide_gpu(index: Any, use_gpu: bool | None, k: int = 1, nprobe: int = 1) -> bool:
    """Whether to run ``index`` on a GPU.

    Args:
        index: the CPU index.
        use_gpu: None = yes when faiss has GPU support and sees a GPU and the index, ``k`` and ``nprobe`` fit
            (else the CPU, silently); True = yes, or an error saying why not; False = never.
        k: neighbours per query.
        nprobe: IVF lists visited per query.

    Raises:
        RuntimeError: ``use_gpu=True`` but faiss has no GPU support or sees no GPU.
        ValueError: ``use_gpu=True`` but the index type, ``k`` or ``nprobe`` has no GPU version.
    """
    if use_gpu is False:
        return False
    fits = gpu_capable(index) and k <= _GPU_MAX_K and nprobe <= _GPU_MAX_K
    if use_gpu is None:
        return fits and gpu_available()
    if not gpu_available():
        raise RuntimeError(
            "use_gpu=True but faiss has no GPU support or sees no GPU (vitssl._faiss.faiss_info() says which); "
            "install the GPU build of faiss (see the README) or pass use_gpu=False"
        )
    if not fits:
        kind = type(faiss.downcast_index(index)).__name__
        raise ValueError(
            f"use_gpu=True: faiss runs Flat and IVF-Flat indexes with k and nprobe <= {_GPU_MAX_K} on a GPU, "
            f"not a {kind} with k={k}, nprobe={nprobe}; pass use_gpu=None to fall back to the CPU"
        )
    return True


@functools.lru_cache(maxsize=1)
def _gpu_resources() -> Any:
    """One StandardGpuResources per process: it holds the cuBLAS handles and a scratch memory pool."""
    return faiss.StandardGpuResources()


def index_cpu_to_gpu(index: Any) -> Any:
    """A GPU copy of a CPU index on the current device (``CUDA_VISIBLE_DEVICES`` picks it per rank)."""
    return faiss.index_cpu_to_gpu(_gpu_resources(), 0, index)


def index_gpu_to_cpu(index: Any) -> Any:
    """A CPU copy of a GPU index (only CPU indexes can be written or merged)."""
    return faiss.index_gpu_to_cpu(index)


def is_gpu_index(index: Any) -> bool:
    while index is not None:
        index = faiss.downcast_index(index)
        if type(index).__name__.startswith("Gpu"):
            return True
        index = getattr(index, "index", None)
    return False


__all__ = ["decide_gpu", "gpu_available", "gpu_capable", "index_cpu_to_gpu", "index_gpu_to_cpu", "is_gpu_index"]
