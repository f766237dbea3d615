"""Retrieval indexes: faiss index folders built, sharded, merged, queried and evaluated (``index.core``).

Submodules are imported where they are used; importing this package loads none of them (faiss stays unloaded
until an index is touched).
"""
