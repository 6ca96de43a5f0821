"""The project's own small exception hierarchy: every message names the file and the problem."""

from __future__ import annotations

import unicodedata
from pathlib import Path


def printable(text: str) -> str:
    """The text with control and format characters written as escapes (``\\x1b``), so a file name, a server's header or a
    DICOM description can never move the cursor, recolour, retitle or rewrite a terminal, nor break a message's one line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or unicodedata.category(c) == "Zs" else
                   f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"
                   for c in text)


class CBIRError(Exception):
    """Base of every error CBIRSlicer raises on purpose; the CLI prints these as one line (control characters escaped)."""

    def __str__(self) -> str:
        return printable(super().__str__())


class InputError(CBIRError):
    """Bad input from a named file or folder."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class UnsupportedFormatError(InputError):
    """The file is not in a format CBIRSlicer reads."""


class UnreadableFileError(InputError):
    """The file is in a known format but cannot be read (corrupt, truncated, missing)."""


class DimensionError(InputError):
    """The image is not a scalar 3D volume (2D, 4D, multi-component)."""


class EmptySourceError(InputError):
    """A folder holds nothing CBIRSlicer can read."""


class GeometryFileError(InputError):
    """A file's header places its voxels impossibly: zero or negative spacing, a singular or skewed direction matrix."""


class DicomSeriesError(InputError):
    """A DICOM series is inconsistent: missing slices, mixed sizes or orientations."""


class GeometryError(CBIRError):
    """A region or coordinate request does not fit the volume (for example an ROI outside it)."""


class ParameterError(CBIRError):
    """An option value is malformed (a window, a montage grid, an ROI string)."""


class ModelError(CBIRError):
    """A model cannot be created or used as asked (unknown name, no text tower, bad images)."""


class ModelUnavailableError(ModelError):
    """A model's weights are neither in the local cache nor downloadable; the message says how to provide them."""


class WorkerError(CBIRError):
    """An embedding job failed in the background worker; the message carries the worker's reason."""


class JobCancelled(CBIRError):
    """An embedding job was cancelled before it finished."""


class IndexError_(CBIRError):
    """Base of index problems (named with a trailing underscore so it never shadows the builtin IndexError)."""


class IndexLockedError(IndexError_):
    """Another process is writing the index."""


class IndexMismatchError(IndexError_):
    """The index was built with another model or other slicing parameters than asked for."""


class IndexCorruptError(IndexError_):
    """The index folder is missing files or its parts disagree."""


class StoreUnavailableError(IndexError_):
    """The server holding an index (Milvus) does not answer, or refuses the credentials; the message names it and what to do."""


class SourceError(CBIRError):
    """A DICOM database or a PACS could not give what was asked: unreachable, refused, timed out, or the series is gone."""
