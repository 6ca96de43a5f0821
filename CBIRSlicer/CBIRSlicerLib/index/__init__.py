"""Index: the index folder (manifest, FAISS store, SQLite catalog), the items cut from each volume, background builds.

Imports only the base layer, ``imaging`` and ``models``.
"""
