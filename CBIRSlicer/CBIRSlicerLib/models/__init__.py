"""Models: the embedder contract and fingerprint, the name registry, the handcrafted descriptor, torch models, the worker.

Imports only the base layer and ``imaging``.
"""
