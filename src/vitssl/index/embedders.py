"""The built-in embedders (:data:`vitssl.index.pipeline.EMBEDDERS`): ``image``, ``video``, ``thumbnails``, ``tca``.

- ``image`` (corpus ``images``): an engine checkpoint or an exported ``backbone.safetensors``
  (:func:`vitssl.index.image.load_image_model`), one layer's features through the feature cache of
  :mod:`vitssl.eval.features` (whole corpora and shards are cached; a training sample is extracted as it is).
- ``video``, ``thumbnails``, ``tca`` (corpus ``videos``): :class:`vitssl.index.video_embed.VideoEmbedder` with a
  frame model (mean of frame features), raw thumbnails or a ``video_tca`` checkpoint; the frame vectors go into
  the index folder beside the video vectors for chamfer re-ranking.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np

from vitssl.config import ConfigError
from vitssl.index.pipeline import EMBEDDERS, Corpus, Embedding, EmbedOptions, check_embedding, embedding_rows


@EMBEDDERS.register("image")
class ImageEmbedder:
    """One feature layer of an image backbone."""

    name: ClassVar[str] = "image"

    def __init__(self, model: Any, options: EmbedOptions) -> None:
        self.model, self.options = model, options
        self.checkpoint_hash: str | None = model.checkpoint_hash
        self.feature_key: str | None = model.feature_key(options.layer)

    @classmethod
    def open(cls, model: str, corpus: Corpus | None, options: EmbedOptions) -> ImageEmbedder:
        from vitssl.index.image import load_image_model

        if corpus is not None and corpus.kind != "images":
            raise ConfigError(f"the image embedder indexes image corpora, not {corpus.kind} ({corpus.data})")
        return cls(load_image_model(model, options.device), options)

    def embed(self, corpus: Any, rows: Any = None, desc: str | None = None) -> Embedding:
        from vitssl.eval.features import extract_cached, extract_rows

        o = self.options
        if rows is None or isinstance(rows, tuple):  # the whole corpus or a shard: through the feature cache
            fs = extract_cached(
                self.model,
                corpus.data,
                corpus.split,
                o.layer,
                o.cache_dir,
                o.batch_size,
                num_workers=o.num_workers,
                skip_corrupt=o.skip_corrupt,
                rows=rows,
                option="--data",
                dtype="float32",  # an index keeps full precision
            )
            # The cache keeps sample ids, not row numbers: rows count on from the first row asked for (exact
            # unless --skip-corrupt left items out; the faiss ids of a shard are numbered the same way).
            first = rows[0] if rows else 0
            ids = list(fs.sample_ids)
            embedding = Embedding(
                np.asarray(fs.features, dtype=np.float32),
                ids,
                np.arange(first, first + len(ids), dtype=np.int64),
                num_skipped=int(fs.meta.get("skipped", 0)),
            )
        else:  # a training sample: extracted, not cached
            feats, got = extract_rows(
                self.model.feature_fn(o.layer),
                corpus.dataset,
                self.model.sample_fn,
                embedding_rows(len(corpus), rows),
                o.batch_size,
                self.model.device,
                o.num_workers,
                o.skip_corrupt,
                desc=desc or f"training sample of {corpus.data} ({corpus.split}, {o.layer})",
            )
            embedding = Embedding(feats, [corpus.sample_id(int(r)) for r in got], got, num_skipped=len(rows) - len(got))
        return check_embedding(embedding, self.name)

    def embed_queries(self, images: list[str]) -> np.ndarray:
        """(Q, D) vectors of image files."""
        return self.model.embed_images(images, self.options.layer)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": str(self.model.path),
            "layer": self.options.layer,
            "transform": self.model.transform,
        }

    def source(self, corpus: Corpus) -> dict[str, Any]:
        return {
            "checkpoint_path": str(self.model.path),
            "objective": self.model.objective_name,
            "data": corpus.data,
            "split": corpus.split,
            "layer": self.options.layer,
        }

    def manifest_entries(self, embedding: Embedding) -> dict[str, Any]:
        return {}


class _VideoEmbedder:
    """What the three video embedders share: a :class:`~vitssl.index.video_embed.VideoEmbedder` over video paths."""

    name: ClassVar[str]
    method: ClassVar[str]  # the VideoEmbedder method the model must give

    def __init__(self, video: Any, skip_corrupt: bool = False) -> None:
        self.video, self.skip_corrupt = video, skip_corrupt
        self.checkpoint_hash: str | None = video.checkpoint_hash
        self.feature_key: str | None = video.feature_key

    @classmethod
    def _fits(cls, model: str) -> bool:
        raise NotImplementedError

    @classmethod
    def open(cls, model: str, corpus: Any, options: EmbedOptions) -> _VideoEmbedder:
        from vitssl.index.video_embed import VideoEmbedder

        if corpus is not None and corpus.kind != "videos":
            raise ConfigError(f"the {cls.name} embedder indexes video corpora, not {corpus.kind} ({corpus.data})")
        if not cls._fits(model):
            raise ConfigError(f"embedder {cls.name!r} cannot embed with {model}: {cls.__doc__}")
        video = VideoEmbedder.open(
            model,
            fps=corpus.fps if corpus is not None else 1.0,
            num_frames=corpus.num_frames if corpus is not None else None,
            layer=options.layer,
            device=options.device,
            cache_dir=options.cache_dir,
            batch_size=min(options.batch_size, 256),
        )
        return cls(video, options.skip_corrupt)

    def embed(self, corpus: Any, rows: Any = None, desc: str | None = None) -> Embedding:
        from vitssl.data.common import CorruptImageError
        from vitssl.eval.features import corrupt_sample_error
        from vitssl.index.video_embed import embed_shared

        wanted = embedding_rows(len(corpus), rows)
        paths = [corpus.paths[r] for r in wanted]
        try:
            e = embed_shared(self.video, paths, skip_corrupt=self.skip_corrupt, desc=desc or corpus.data)
        except CorruptImageError as err:  # a corrupt video: named, with the option that skips it
            raise corrupt_sample_error(err) from None
        embedding = Embedding(
            e.vectors,
            [paths[i] for i in e.rows],
            wanted[e.rows],
            skipped=list(e.skipped),
            num_skipped=len(e.skipped),
            frames=list(e.frames),
        )
        return check_embedding(embedding, self.name)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **self.video.describe()}

    def source(self, corpus: Corpus) -> dict[str, Any]:
        return {
            "checkpoint_path": self.video.model,
            "objective": self.video.method,
            "data": corpus.data,
            "split": corpus.split,
        }

    def manifest_entries(self, embedding: Embedding) -> dict[str, Any]:
        frames = embedding.frames or []
        frame_dim = int(frames[0].shape[1]) if frames else 0
        return {"video": {**self.video.describe(), "frame_dim": frame_dim, "skipped": list(embedding.skipped or [])}}


@EMBEDDERS.register("video")
class MeanOfFramesEmbedder(_VideoEmbedder):
    """an image checkpoint or backbone.safetensors: the mean of its L2-normalised frame features"""

    name: ClassVar[str] = "video"

    @classmethod
    def _fits(cls, model: str) -> bool:
        from vitssl.index.video_embed import checkpoint_objective, is_thumbnails

        return not is_thumbnails(model) and checkpoint_objective(model) != "video_tca"


@EMBEDDERS.register("thumbnails")
class ThumbnailsEmbedder(_VideoEmbedder):
    """thumbnails[:size=N]: raw downscaled frames, no network"""

    name: ClassVar[str] = "thumbnails"

    @classmethod
    def _fits(cls, model: str) -> bool:
        from vitssl.index.video_embed import is_thumbnails

        return is_thumbnails(model)


@EMBEDDERS.register("tca")
class TCAIndexEmbedder(_VideoEmbedder):
    """a video_tca checkpoint: TCA video vectors and frame outputs at the checkpoint's own frame rate"""

    name: ClassVar[str] = "tca"

    @classmethod
    def _fits(cls, model: str) -> bool:
        from vitssl.index.video_embed import checkpoint_objective

        return checkpoint_objective(model) == "video_tca"


def for_video_embedder(video: Any, skip_corrupt: bool = False) -> _VideoEmbedder:
    """The pipeline embedder of an opened :class:`~vitssl.index.video_embed.VideoEmbedder` (by its method and
    model)."""
    from vitssl.index.video_embed import is_thumbnails

    if video.method == "tca":
        return TCAIndexEmbedder(video, skip_corrupt)
    if is_thumbnails(video.model):
        return ThumbnailsEmbedder(video, skip_corrupt)
    return MeanOfFramesEmbedder(video, skip_corrupt)


__all__ = ["ImageEmbedder", "MeanOfFramesEmbedder", "TCAIndexEmbedder", "ThumbnailsEmbedder", "for_video_embedder"]
