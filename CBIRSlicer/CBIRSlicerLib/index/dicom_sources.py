"""Where hospitals keep images, as index sources: Slicer's DICOM database (CTK's SQLite schema) and a PACS over DICOMweb.

A source is named ``ctkdb:PATH`` (or just the path of a CTK database file: ``ctkDICOM.sql``) or ``dicomweb:URL``; the
catalog keeps that name as the case's source and the series' UIDs, so a result can be found again: in the database's
files, or fetched from the PACS into a local cache (:func:`local_series`). The database is opened read-only
(``mode=ro``) and never written. Indexing itself (fetch, embed, clean up, skip what is already indexed) is
:meth:`Index.add_sources`'s, which calls :func:`plan` here.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import InputError, SourceError, printable
from ..imaging import body_parts
from ..imaging.readers import CaseSource, sort_dicom_files
from .dicomweb import PREFIX as DICOMWEB_PREFIX
from .dicomweb import DicomWebServer
from .dicomweb_listing import ListingShapeError, SeriesEntry, SeriesFilter, check_uid

CTK_PREFIX = "ctkdb:"
CTK_TABLES = ("Patients", "Studies", "Series", "Images")
CACHE_VARIABLE = "CBIR_DICOM_CACHE"
_COMPLETE = ".complete"  # written into a cached series folder once every instance is there


@dataclass
class DicomOptions:
    """How DICOM sources are listed and fetched: which series, where downloads go, credentials and patience."""

    filters: SeriesFilter = field(default_factory=SeriesFilter)
    keep_downloads: str | None = None  # keep fetched series here (one folder per series UID) instead of a temporary folder
    auth_file: str | None = None
    timeout: float = 30.0


def is_remote_source(source: str) -> bool:
    """Whether a catalog source names a DICOM database or a PACS rather than a file or folder."""
    return source.startswith((CTK_PREFIX, DICOMWEB_PREFIX))


def is_ctk_database(path: str) -> bool:
    """Whether a file is an SQLite database with CTK's DICOM tables (what Slicer keeps as ctkDICOM.sql)."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as handle:
        if handle.read(16) != b"SQLite format 3\x00":
            return False
    try:
        db = _connect(path)
    except sqlite3.DatabaseError:
        return False
    try:
        found = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError:
        return False
    finally:
        db.close()
    return all(t in found for t in CTK_TABLES)


def is_dicom_source(spec: str) -> bool:
    """Whether an index source is a DICOM database or a PACS (else it is a file or folder)."""
    return spec.startswith((CTK_PREFIX, DICOMWEB_PREFIX)) or is_ctk_database(spec)


def _connect(path: str) -> sqlite3.Connection:
    """Read-only: SQLite refuses every write, and no journal or lock file is made beside Slicer's database."""
    return sqlite3.connect("file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro", uri=True, timeout=10)


class CtkDatabase:
    """Slicer's DICOM database file, read as CTK's schema: Patients > Studies > Series > Images (file paths)."""

    def __init__(self, path: str):
        path = path[len(CTK_PREFIX):] if path.startswith(CTK_PREFIX) else path
        self.path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(self.path):
            raise InputError(self.path, "no such DICOM database file (Slicer keeps it as ctkDICOM.sql in its DICOM database folder)")
        try:
            self.db = _connect(self.path)
            found = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as error:
            raise InputError(self.path, f"cannot be read as an SQLite database ({error})") from None
        missing = [t for t in CTK_TABLES if t not in found]
        if missing:
            self.db.close()
            raise InputError(self.path, f"is not a CTK DICOM database (Slicer's ctkDICOM.sql): it lacks the table(s) {', '.join(missing)}")

    @property
    def source(self) -> str:
        """The catalog's name for this database."""
        return CTK_PREFIX + self.path

    def close(self) -> None:
        """Close the file."""
        self.db.close()

    def series(self, wanted: SeriesFilter | None = None) -> list[SeriesEntry]:
        """The database's series that pass the filter, with their study date and image count, by study then series UID."""
        wanted = wanted or SeriesFilter()
        clauses, values = [], []
        if wanted.modalities:
            clauses.append(f"upper(Series.Modality) IN ({','.join('?' * len(wanted.modalities))})")
            values += [m.upper() for m in wanted.modalities]
        # CTK stores dates as DICOM writes them (YYYYMMDD) or as ISO dates, by version: compare on the digits.
        date = "replace(coalesce(Studies.StudyDate, Series.SeriesDate), '-', '')"
        if wanted.date_from:
            clauses.append(f"{date} >= ?")
            values.append(wanted.date_from)
        if wanted.date_to:
            clauses.append(f"{date} <= ?")
            values.append(wanted.date_to)
        query = (f"SELECT Series.StudyInstanceUID, Series.SeriesInstanceUID, Series.Modality, Series.BodyPartExamined, {date}, "
                 "Series.SeriesDescription, (SELECT COUNT(*) FROM Images WHERE Images.SeriesInstanceUID = Series.SeriesInstanceUID) "
                 "FROM Series LEFT JOIN Studies ON Studies.StudyInstanceUID = Series.StudyInstanceUID"
                 + (f" WHERE {' AND '.join(clauses)}" if clauses else "") + " ORDER BY Series.StudyInstanceUID, Series.SeriesInstanceUID")
        try:
            rows = self.db.execute(query, values).fetchall()
        except sqlite3.DatabaseError as error:
            raise InputError(self.path, f"its Series table cannot be read ({error})") from None
        entries = [SeriesEntry(_text(study) or "", _text(series) or "", _text(modality), _text(body), _text(day), _text(description),
                               count) for study, series, modality, body, day, description, count in rows if _text(series)]
        return [e for e in entries if body_parts.passes(e.body_part, wanted.body_part)]  # regions of Annex L words

    def files(self, series_uid: str) -> list[str]:
        """The files of a series, absolute (CTK stores files inside its folder relative to it), in slice order; a row
        whose Filename is empty or not text (SQLite keeps whatever it is given) is named as it is, so it counts as missing."""
        base = os.path.dirname(self.path)
        try:
            rows = self.db.execute("SELECT Filename FROM Images WHERE SeriesInstanceUID = ?", (series_uid,)).fetchall()
        except sqlite3.DatabaseError as error:
            raise InputError(self.path, f"its Images table cannot be read ({error})") from None
        names = [os.fsdecode(name) if isinstance(name, bytes) else "" if name is None else str(name) for (name,) in rows]
        return [os.path.normpath(name if os.path.isabs(name) else os.path.join(base, name)) if name else "(an empty Filename)"
                for name in names]

    def case_source(self, entry: SeriesEntry) -> CaseSource:
        """The series as a readable case: its files (all present) in slice order. Raises SourceError naming what is missing."""
        files = self.files(entry.series_uid)
        if not files:
            raise SourceError(f"{entry.label}: the database lists no files for it")
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise SourceError(f"{entry.label}: {len(missing)} of its {len(files)} files are missing (first {missing[0]}) in "
                              f"{self.source}")
        ordered = sort_dicom_files(files)
        return CaseSource(path=os.path.commonpath(ordered) if len(ordered) > 1 else os.path.dirname(ordered[0]),
                          series_uid=entry.series_uid, files=tuple(ordered))


def _text(value: object) -> str | None:
    """A database value as text (CTK's columns are typed loosely: a number or bytes may stand where text should), control
    characters escaped; None for NULL or empty."""
    if value is None:
        return None
    text = (value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)).strip()
    return printable(text) or None


class Planned:
    """One series to index: its entry, how to get it as local files (``obtain(should_stop)``), and how to let them go after."""

    def __init__(self, entry: SeriesEntry, obtain: Callable[[Callable[[], bool] | None], CaseSource],
                 release: Callable[[CaseSource], None]):
        self.entry = entry
        self.obtain = obtain
        self.release = release


def plan(spec: str, options: DicomOptions) -> tuple[str, list[Planned], Callable[[], None], list[str]]:
    """A DICOM source's catalog name, its series that pass the filters, a function that closes it, and what the user
    should know of how the series were listed (a PACS that ignores 'offset')."""
    if spec.startswith(DICOMWEB_PREFIX):
        server = DicomWebServer(spec, options.auth_file, options.timeout)
        entries = server.series(options.filters)

        def fetch(entry: SeriesEntry, should_stop: Callable[[], bool] | None = None) -> CaseSource:
            root = options.keep_downloads or tempfile.mkdtemp(prefix="cbir-dicomweb-")
            try:  # whatever fails after the download (sorting reads every header), the temporary copy goes with it
                files = server.fetch(entry, os.path.join(root, entry.series_uid), should_stop=should_stop)
                return CaseSource(path=os.path.dirname(files[0]), series_uid=entry.series_uid, files=tuple(sort_dicom_files(files)))
            except BaseException:
                if options.keep_downloads is None:
                    import shutil

                    shutil.rmtree(root, ignore_errors=True)
                raise

        def release(source: CaseSource) -> None:
            if options.keep_downloads is None:  # a temporary download goes as soon as it is embedded
                import shutil

                shutil.rmtree(os.path.dirname(source.path), ignore_errors=True)

        return server.source, [Planned(e, lambda stop, e=e: fetch(e, stop), release) for e in entries], lambda: None, server.notes
    database = CtkDatabase(spec)
    entries = database.series(options.filters)
    return (database.source, [Planned(e, lambda stop, e=e: database.case_source(e), lambda _: None) for e in entries],
            database.close, [])


def cache_folder() -> str:
    """Where series fetched to be opened are kept (env CBIR_DICOM_CACHE, else the user's cache folder)."""
    given = os.environ.get(CACHE_VARIABLE)
    if given:
        return given
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "cbirslicer", "dicom")


def local_series(source: str, series_uid: str, study_uid: str | None = None, cache: str | None = None, auth_file: str | None = None,
                 progress: Callable[[int, int | None], None] | None = None, should_stop: Callable[[], bool] | None = None,
                 timeout: float = 30.0) -> CaseSource:
    """A result's series as local files: the database's own files, or the PACS's fetched into the cache on first use."""
    if source.startswith(CTK_PREFIX):
        database = CtkDatabase(source)
        try:
            return database.case_source(SeriesEntry(study_uid or "", series_uid))
        finally:
            database.close()
    if not source.startswith(DICOMWEB_PREFIX):
        raise InputError(source, "is neither a DICOM database (ctkdb:) nor a DICOMweb server (dicomweb:)")
    try:  # it names a folder of the cache: a saved search or a catalog could hold anything
        check_uid(series_uid)
    except ListingShapeError as error:
        raise SourceError(f"{source}: cannot fetch series {series_uid}: {error}") from None
    folder = os.path.join(cache or cache_folder(), series_uid)
    if not os.path.isfile(os.path.join(folder, _COMPLETE)):
        server = DicomWebServer(source, auth_file, timeout)
        entry = server.entry(series_uid, study_uid)  # its instance count, for progress and for checking what came
        os.makedirs(os.path.dirname(folder), exist_ok=True)
        server.fetch(entry, folder, progress, should_stop)
        open(os.path.join(folder, _COMPLETE), "w").close()
    files = [os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.endswith(".dcm")]
    return CaseSource(path=folder, series_uid=series_uid, files=tuple(sort_dicom_files(files)))
