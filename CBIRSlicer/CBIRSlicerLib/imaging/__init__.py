"""Imaging: volumes with exact geometry, their readers, ROIs, slices and crops, intensity windows, blobs, PNG.

The first stage of the road; imports only the base layer (``errors``, ``digests``, ``threads``).
"""
