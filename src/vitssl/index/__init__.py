"""Retrieval indexes: Corpus -> Embedder -> Store, then search and evaluation.

- :mod:`vitssl.index.pipeline`: the :class:`~vitssl.index.pipeline.Corpus` and
  :class:`~vitssl.index.pipeline.Embedder` protocols, their registries (``CORPORA``, ``EMBEDDERS``) and the
  :class:`~vitssl.index.pipeline.IndexSpec` saved with every index; :mod:`vitssl.index.corpora` and
  :mod:`vitssl.index.embedders` register the built-in kinds.
- :mod:`vitssl.index.build`: :func:`~vitssl.index.build.index_build` / ``index_train`` / ``index_merge`` (what
  ``vitssl index build`` runs) and ``build_index_dir`` (a folder from embeddings).
- :mod:`vitssl.index.factory` (faiss objects), :mod:`vitssl.index.store` (folders), :mod:`vitssl.index.shards`,
  :mod:`vitssl.index.search`, :mod:`vitssl.index.query` (image queries and ground truth); :mod:`vitssl.index.core`
  gathers their public names.
- Videos: :mod:`vitssl.index.video` (load, rank, evaluate), with :mod:`vitssl.index.video_embed`,
  :mod:`vitssl.index.chamfer`, :mod:`vitssl.index.frames`, :mod:`vitssl.index.video_grid`.

Submodules are imported where they are used; importing this package loads none of them (faiss stays unloaded
until an index is touched).
"""
