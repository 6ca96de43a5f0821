"""Retrieval: queries and search over an index, case ranking (MaxSim) and placing the match, evaluation metrics.

Imports only the base layer, ``imaging``, ``models`` and ``index``.
"""
