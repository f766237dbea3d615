"""The per-process memos of :mod:`vitssl.video.io`: verified frame indexes, open TorchCodec decoders, decord checks.

One least-recently-used helper serves the frame indexes (keyed by path, size and mtime, so a replaced file is
indexed again) and the open decoders (an exact-mode open scans the whole file, so a few stay open per process).
:func:`clear_cache` forgets them (tests; a process that rewrites files in place).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vitssl.video.io.probing import _Index

_CACHE_SIZE = 4096  # per-process memo of verified indexes (a few KB each), keyed by path, size and mtime
_OPEN_DECODERS = 8  # torchcodec decoders kept open per process (an exact-mode open scans the whole file)

_INDEX_CACHE: OrderedDict[tuple[str, int, int], _Index] = OrderedDict()
_DECORD_OK: dict[tuple[str, int, int], bool] = {}  # whether decord gives 3-channel frames for a file
_TC_DECODERS: OrderedDict[tuple[Any, ...], Any] = OrderedDict()  # open torchcodec decoders of this process
_TC_PID: list[int] = [os.getpid()]  # decoders opened in a parent are never used in a forked worker


def _lru_get(cache: OrderedDict, key: Any, size: int, make: Callable[[], Any]) -> Any:
    """``cache[key]``, made by ``make()`` on a miss; the least recently used entry goes past ``size``."""
    found = cache.get(key)
    if found is None:
        found = cache[key] = make()
        if len(cache) > size:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return found


def clear_cache(indexes: bool = True) -> None:
    """Forget memoised frame indexes and open decoders (tests; a process that rewrites files in place).

    Args:
        indexes: also forget the frame indexes (False: only the open torchcodec decoders and decord checks).
    """
    if indexes:
        _INDEX_CACHE.clear()
    _DECORD_OK.clear()
    _TC_DECODERS.clear()
