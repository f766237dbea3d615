"""The one module that imports faiss: it loads faiss tuned for this CPU and says whether faiss has GPUs.

Everything else takes ``faiss`` from here (``from vitssl._faiss import faiss``), so the BLAS set-up below happens
once and in one place. It sits on the lowest floor because objectives (iGPT's k-means palette), evaluation
and the index code all need it.

The faiss-cpu wheels bundle OpenBLAS 0.3.15, which predates AMD Zen 4/5 and Intel's newer Xeons: it does not
know their CPU models and falls back to pre-AVX GEMM kernels ("Barcelona" on a Zen 5 machine, "Prescott" on an
AVX-512 Xeon) unless ``OPENBLAS_CORETYPE`` says otherwise; newer OpenBLAS releases pick the AVX-512 (SkylakeX)
kernels on these CPUs. ``_import_faiss`` selects them the same way while faiss loads its OpenBLAS, only when
the CPU reports the AVX-512 subsets those kernels use and never over a user's own ``OPENBLAS_CORETYPE``. Exact
search (IndexFlatIP, 50k x 768 bank, 2k queries) runs about 4x faster with them on the Zen 5 machine and 3.4x
faster on the Xeon (11.5 s -> 3.4 s); benchmarks/RESULTS.md, "Evaluation".

faiss's loader logs at INFO which SIMD build it tried ("Could not load library with AVX2 support ..."), on
every command: those records pass only while vitssl logs at DEBUG (``-v``).

faiss-cpu and the GPU builds (faiss-gpu, faiss-gpu-cu12, ...) are separate distributions that install the same
module ``faiss`` over each other; with both installed, the module is whichever was installed last and
uninstalling either breaks the other. Importing this module warns (once) when it finds more than one;
:func:`faiss_info` says which faiss is loaded and whether it has GPUs.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

_logger = logging.getLogger(__name__)

# AVX-512 subsets that OpenBLAS's SkylakeX SGEMM kernels use; all must be present to select them.
_SKYLAKEX_FLAGS = ("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl")


def _cpu_flags() -> set[str]:
    """Feature flags of the first CPU from /proc/cpuinfo (empty where unavailable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    return set(value.split())
    except OSError:
        pass
    return set()


def _import_faiss() -> ModuleType:
    """Import faiss; on AVX-512 CPUs let its bundled OpenBLAS use the AVX-512 GEMM kernels (see module doc).

    The variable is set only for the duration of the import (OpenBLAS reads it once, when it loads), so it does
    not leak into subprocesses, e.g. SLURM jobs that may run on CPUs without AVX-512.
    """
    if "faiss" in sys.modules:
        return sys.modules["faiss"]
    flags = _cpu_flags()
    tune = (
        sys.platform.startswith("linux")
        and "OPENBLAS_CORETYPE" not in os.environ
        and all(f in flags for f in _SKYLAKEX_FLAGS)
    )
    if tune:
        os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
    try:
        import faiss
    finally:
        if tune:
            del os.environ["OPENBLAS_CORETYPE"]
    return faiss


def _check_complete(module: ModuleType) -> ModuleType:
    """Fail clearly on a ``faiss`` folder without the library, which Python imports as an empty namespace."""
    if hasattr(module, "IndexFlatL2"):
        return module
    dists = faiss_distributions()
    keep = next((d for d in dists if _is_gpu_distribution(d)), dists[0] if dists else "faiss-cpu")
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        keep = f"'{keep}=={importlib.metadata.version(keep)}'"
    raise ImportError(
        f"faiss at {list(getattr(module, '__path__', []))} is incomplete: uninstalling one of two faiss builds "
        f"removes the files both wrote. Reinstall the build to keep (installed now: {', '.join(dists) or 'none'}): "
        f"pip install --force-reinstall --no-deps {keep}"
    )


def _is_gpu_distribution(name: str) -> bool:
    return "gpu" in name.lower() or "cuda" in name.lower()


def faiss_distributions() -> list[str]:
    """Names of the installed distributions that provide the module ``faiss`` (sorted; normally exactly one).

    Looks only at ``faiss*`` metadata folders on ``sys.path`` (scanning every distribution takes ~0.1-1 s) and
    keeps those whose file list has a top-level ``faiss/``, so "faiss-cpu", "faiss-gpu", "faiss-gpu-cu12" and
    later builds count and plugins such as "faiss-haystack" do not.
    """
    names: set[str] = set()
    for entry in sys.path:
        try:
            found = [*Path(entry or ".").glob("faiss*.dist-info"), *Path(entry or ".").glob("faiss*.egg-info")]
        except OSError:
            continue
        for folder in found:
            dist = importlib.metadata.PathDistribution(folder)
            name = dist.metadata["Name"] if dist.metadata else None
            if not name:
                continue
            files = dist.files
            if files is None:  # no file list: trust the build names
                provides = name.lower().startswith(("faiss-cpu", "faiss-gpu", "faiss-cuda"))
            else:
                provides = any(f.parts[:1] == ("faiss",) for f in files)
            if provides:
                names.add(name)
    return sorted(names)


def _gpu_fix_command(distributions: list[str]) -> str:
    """The commands that leave one faiss, the GPU build, in place of several."""
    gpu = next(d for d in distributions if _is_gpu_distribution(d))
    others = [d for d in distributions if d != gpu]
    try:  # the version installed now: the reinstall restores its files and changes nothing else
        pinned = f"{gpu}=={importlib.metadata.version(gpu)}"
    except importlib.metadata.PackageNotFoundError:
        pinned = gpu
    return f"pip uninstall -y {' '.join(others)} && pip install --force-reinstall --no-deps '{pinned}'"


def _warn_if_several_faiss() -> None:
    """Warn when more than one distribution provides ``faiss`` (once, at import, before faiss loads: such an
    install often fails to load, and the warning says why)."""
    dists = faiss_distributions()
    if len(dists) < 2:
        return
    if any(_is_gpu_distribution(d) for d in dists):
        fix = f"keep one, e.g. the GPU build: {_gpu_fix_command(dists)}"
    else:
        fix = f"keep one: pip uninstall -y {' '.join(dists)} && pip install {dists[0]}"
    _logger.warning(
        "several faiss builds are installed (%s); they write the same module `faiss` over each other, so the one "
        "that loads is a mix or whichever was installed last, and uninstalling one breaks the other "
        "(vitssl._faiss.faiss_info() says which loaded): %s",
        ", ".join(dists),
        fix,
    )


class _QuietUnlessDebug(logging.Filter):
    """Passes faiss loader records below WARNING only while vitssl logs at DEBUG (decided per record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or _logger.isEnabledFor(logging.DEBUG)


_warn_if_several_faiss()
# Installed before the import, which is when the loader logs.
logging.getLogger("faiss.loader").addFilter(_QuietUnlessDebug())
faiss = _check_complete(_import_faiss())


def gpu_available() -> bool:
    """Whether this faiss build has GPU indexes and sees at least one GPU (then k-NN and indexes use it)."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def faiss_info() -> dict[str, Any]:
    """Which faiss is loaded and whether it can use GPUs.

    Returns:
        ``version``, ``path`` (the loaded package folder), ``distributions`` (installed distributions that
        provide ``faiss``; more than one is a broken install), ``gpu_support`` (GPU indexes compiled in),
        ``num_gpus`` (GPUs it sees; 0 without GPU support), ``compile_options`` (SIMD level, "GPU", ...).
    """
    gpu_support = hasattr(faiss, "StandardGpuResources")
    return {
        "version": getattr(faiss, "__version__", None),
        "path": str(Path(faiss.__file__).parent) if getattr(faiss, "__file__", None) else None,
        "distributions": faiss_distributions(),
        "gpu_support": gpu_support,
        "num_gpus": int(faiss.get_num_gpus()) if gpu_support else 0,
        "compile_options": faiss.get_compile_options() if hasattr(faiss, "get_compile_options") else None,
    }
