"""Frozen-feature evaluation: feature extraction and cache, k-NN, linear probes, retrieval indexes, zero-shot.

Submodules are imported where they are used; importing this package loads none of them (``knn`` and
``retrieval`` import faiss, which the command line must not pay for when it only builds its parser).
"""
