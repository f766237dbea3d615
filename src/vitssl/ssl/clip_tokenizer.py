"""CLIP's byte-pair-encoding tokenizer (open_clip's ``SimpleTokenizer`` over the vocabulary inside the package).

Its own module so that both the CLIP objective (:mod:`vitssl.ssl.clip`) and the open_clip interop
(:mod:`vitssl.ssl.open_clip_io`, whose loader the objective calls) use it without importing each other.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from vitssl.config import ConfigError


@functools.lru_cache(maxsize=1)
def _simple_tokenizer() -> Any:
    """open_clip's ``SimpleTokenizer`` over its bundled ``bpe_simple_vocab_16e6.txt.gz`` (loaded once per process).

    It is built directly rather than through ``open_clip.get_tokenizer``, which may resolve a model name to a
    Hugging Face tokenizer; this one only reads the file inside the installed package.
    """
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


class ClipTokenizer:
    """CLIP's byte-pair-encoding tokenizer: captions to ``(N, context_length)`` token ids and back.

    Each row is ``<start_of_text> tokens <end_of_text>`` followed by zeros; text is lower-cased and
    whitespace-cleaned first; a caption longer than the context is truncated and still ends with
    ``<end_of_text>`` (open_clip's behaviour). Pickles without its vocabulary tables, so sample functions
    holding one are cheap to send to data-loading workers.

    Args:
        context_length: tokens per row including the start and end tokens (CLIP: 77).
    """

    def __init__(self, context_length: int = 77) -> None:
        if context_length < 3:
            raise ConfigError(f"objective.context_length must be >= 3 (start, a token, end), got {context_length}")
        self.context_length = int(context_length)

    @property
    def vocab_size(self) -> int:
        return len(_simple_tokenizer().encoder)

    @property
    def sot_token_id(self) -> int:
        return int(_simple_tokenizer().sot_token_id)

    @property
    def eot_token_id(self) -> int:
        return int(_simple_tokenizer().eot_token_id)

    def __call__(self, texts: str | Sequence[str]) -> torch.Tensor:
        """Token ids ``(N, context_length)`` int64 of one caption or a list of captions."""
        if isinstance(texts, str):
            texts = [texts]
        return _simple_tokenizer()(list(texts), context_length=self.context_length)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """The cleaned text of one row of token ids, without the start / end tokens and the padding."""
        tok = _simple_tokenizer()
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if ids and ids[0] == tok.sot_token_id:
            ids = ids[1:]
        if tok.eot_token_id in ids:  # padding follows it (id 0 is also a real token, "!", so cut here)
            ids = ids[: ids.index(tok.eot_token_id)]
        return tok.decode(ids).strip()

    def __repr__(self) -> str:
        return f"ClipTokenizer(context_length={self.context_length})"


__all__ = ["ClipTokenizer"]
