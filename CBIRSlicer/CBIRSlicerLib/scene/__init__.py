"""Scene: MRML glue that runs under Slicer and slicer-core (nodes, the side-by-side layout, search sessions, results).

Imports any earlier layer; the only package whose modules call MRML, and only ``nodes`` imports ``slicer``.
"""
