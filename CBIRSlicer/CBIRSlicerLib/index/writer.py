"""Writing cases into an index: new volumes indexed, changed ones re-indexed, unchanged ones skipped, resumably.

A case is inserted as 'pending' and its vectors are added in memory; a checkpoint replaces the vectors file atomically
*before* marking the case 'complete' (:meth:`IndexFolder.checkpoint`), and a writer opening the index purges pending cases,
so a killed build resumes without duplicates or losses. Sources are files and folders (:func:`imaging.readers.discover`),
a DICOM database or a PACS (:mod:`dicom_sources`), or vectors computed elsewhere (:class:`EmbeddedCase`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..digests import file_sha256
from ..errors import CBIRError, InputError, ParameterError, printable
from ..imaging.body_region import fill_in
from ..imaging.readers import CaseSource, discover, read_case
from ..imaging.volume import Volume
from ..models.base import Embedder, modality_warning
from . import privacy
from .catalog import CaseRecord, ItemRecord
from .dicom_sources import DicomOptions, is_dicom_source, is_remote_source, plan
from .dicomweb import PREFIX as DICOMWEB_PREFIX
from .faiss_store import vector_problem
from .items import IndexSettings, VolumeItems, volume_items, volume_items_3d, volume_items_dense
from .maintenance import IndexFolder

# Seconds between checkpoints while building (vectors saved, cases marked complete); env CBIR_CHECKPOINT_SECONDS.
CHECKPOINT_SECONDS = float(os.environ.get("CBIR_CHECKPOINT_SECONDS", "20"))


def case_id_for(source: CaseSource) -> str:
    """A stable public id for a case: from its absolute path and series UID."""
    key = f"{os.path.abspath(source.path)}|{source.series_uid or ''}"
    return "c" + hashlib.sha1(key.encode()).hexdigest()[:15]


def remote_case_id(source: str, series_uid: str) -> str:
    """A stable public id for a series of a DICOM database or a PACS: from the source's name and the series UID."""
    return "c" + hashlib.sha1(f"{source}|{series_uid}".encode()).hexdigest()[:15]


def source_checksum(source: CaseSource) -> str:
    """SHA-256 of a volume file, or of a DICOM series' files in order."""
    if not source.files:
        return file_sha256(source.path)
    digest = hashlib.sha256()
    for path in source.files:
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def embedded_items(volume: Volume, settings: IndexSettings, embedder: Embedder) -> tuple[VolumeItems, np.ndarray]:
    """A volume's items and their vectors: slices, tiles and blob crops for 2D models; whole volume and cells for 3D ones."""
    if embedder.embeds_volumes:
        return volume_items_3d(volume, embedder, settings)
    if settings.resolved(embedder).region_strategy == "dense":
        return volume_items_dense(volume, settings, embedder)
    made = volume_items(volume, settings)
    return made, embedder.embed_images(made.images)


def _load(source: CaseSource, known: dict[str, str | None]) -> tuple[str, Volume | None]:
    """A case's checksum, and its volume unless the index already holds that checksum (read ahead on a thread)."""
    checksum = source_checksum(source)
    return checksum, None if known.get(case_id_for(source)) == checksum else read_case(source)


def content_problem(volume: Volume) -> tuple[str | None, str | None]:
    """(why a volume cannot be indexed, a warning about it): all NaN, constant, or some voxels not finite."""
    data = np.asarray(volume.array)
    if not np.issubdtype(data.dtype, np.floating):
        low, high = data.min(), data.max()
        return (f"every voxel is {low}: a constant volume holds nothing to search for" if low == high else None), None
    finite = np.isfinite(data)
    count = int(finite.sum())
    if count == 0:
        return "no voxel holds a number (all NaN or infinite): nothing to search for", None
    values = data[finite]
    if values.min() == values.max():
        return f"every finite voxel is {float(values.min()):g}: a constant volume holds nothing to search for", None
    if count < data.size:
        return None, f"{data.size - count} of {data.size} voxels are NaN or infinite; indexed as the nearest finite values"
    return None, None


@dataclass
class BuildReport:
    """What a build or an add did."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    vectors: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        """One paragraph for the terminal."""
        lines = [f"{len(self.added)} case(s) added, {len(self.replaced)} refreshed, {len(self.unchanged)} unchanged, "
                 f"{len(self.skipped)} skipped; {self.vectors} vectors added in {self.seconds:.1f} s"]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        lines += [f"  warning {path}: {reason}" for path, reason in self.warnings]
        return "\n".join(lines)

    @property
    def indexed(self) -> int:
        """Cases that are in the index after this run (added, refreshed or already there)."""
        return len(self.added) + len(self.replaced) + len(self.unchanged)


CaseProgress = Callable[[int, int, str], None]  # called with (cases done, cases in all, what is being done)


@dataclass
class EmbeddedCase:
    """A case whose item vectors are already computed (elsewhere, or a benchmark's synthetic cases): what
    :meth:`Index.add_embedded` stores as it is, with no source read and no model run."""

    record: CaseRecord
    items: list[ItemRecord]
    vectors: np.ndarray  # (len(items), the model's dim), L2-normalised, in the items' order
    content_digest: str | None = None  # the voxels' digest (:attr:`Volume.voxel_digest`), so a copy's query leaves it out


@dataclass
class PreparedCase:
    """One case read, checked and embedded, ready for a writer (made in the writer's process, or on a Dask worker):
    its record (metadata still raw: the writer applies the index's privacy policy with its own site key), items, vectors,
    voxel digest and thumbnails; or why it was not (``skipped``), or that the index holds it already (``unchanged``)."""

    case_id: str
    label: str
    checksum: str | None = None
    record: CaseRecord | None = None
    items: list[ItemRecord] = field(default_factory=list)
    vectors: np.ndarray | None = None
    digest: str | None = None
    thumbnails: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    header: dict[str, Any] = field(default_factory=dict)  # the volume's header metadata, identifying fields included
    warning: str | None = None
    skipped: str | None = None
    unchanged: bool = False
    model_digest: str | None = None  # the fingerprint of the model that made the vectors (checked by the writer)


def _fetched_problem(error: BaseException, source: CaseSource) -> str:
    """What went wrong with a series fetched from a PACS, without the download's path (a temporary folder, gone by the time
    the message is read; the label names the server and the series): a file of it is named as the instance it was."""
    folder = source.path.rstrip(os.sep)
    files = [os.path.abspath(f) for f in source.files]
    if isinstance(error, InputError) and error.path is not None:
        where = os.path.abspath(error.path)
        if where == os.path.abspath(folder) or files == [where]:
            return printable(error.problem)
        if where in files:
            return printable(f"instance {files.index(where) + 1} of {len(files)}: {error.problem}")
    return str(error).replace(folder + os.sep, "").replace(folder, "the fetched series")


def prepare_case(source: CaseSource, embedder: Embedder, settings: IndexSettings, labels: list[str], known_checksum: str | None,
                 loaded: Future[tuple[str, Volume | None]] | None = None, remote: str | None = None,
                 label: str | None = None) -> PreparedCase:
    """Read, check and embed one case unless the index holds it with this checksum already; never raises for a case that
    cannot be indexed (``skipped`` says why). ``loaded``: a future of its (checksum, volume); ``remote`` names a DICOM
    database or PACS it came from."""
    case_id = case_id_for(source) if remote is None else remote_case_id(remote, source.series_uid or "")
    label = label or source.label
    prepared = PreparedCase(case_id, label, model_digest=embedder.fingerprint.digest())
    try:
        checksum, volume = loaded.result() if loaded is not None else (source_checksum(source), None)
        prepared.checksum = checksum
        if known_checksum is not None and known_checksum == checksum:
            prepared.unchanged = True
            return prepared
        volume = volume if volume is not None else read_case(source)
        refused, prepared.warning = content_problem(volume)
        if refused:
            raise InputError(None, refused)
        origin = fill_in(volume)  # modality and body part from the image where the file is silent
        mismatch = modality_warning(embedder, volume.modality, origin.get("modality_image"))
        if mismatch:
            origin["model_modality_mismatch"] = mismatch  # flagged in the catalog, warned in the report
            prepared.warning = f"{prepared.warning}; {mismatch}" if prepared.warning else mismatch
        made, vectors = embedded_items(volume, settings, embedder)
        bad = vector_problem(vectors) if len(vectors) else None
        if bad:
            raise InputError(None, f"model '{embedder.name}' returned {bad}; not indexed")
    except (CBIRError, OSError) as error:
        text = _fetched_problem(error, source) if remote is not None and remote.startswith(DICOMWEB_PREFIX) else str(error)
        prepared.skipped = text[len(label) + 2:] if text.startswith(label + ": ") else text
        return prepared
    prepared.record = CaseRecord(
        case_id=case_id, source=remote or os.path.abspath(source.path), name=volume.name, series_uid=volume.series_uid,
        checksum=checksum, modality=volume.modality, body_part=volume.body_part, shape=list(volume.shape_ijk),
        spacing=[round(float(s), 6) for s in volume.spacing], ijk_to_ras=volume.ijk_to_ras.round(6).tolist(),
        labels=labels, metadata={**origin, "window": made.window.as_dict()})
    prepared.header = dict(volume.extra)
    prepared.items, prepared.vectors, prepared.thumbnails = made.items, vectors, made.thumbnails
    prepared.digest = volume.voxel_digest
    return prepared


class IndexWriter(IndexFolder):
    """What a writer (holding the folder lock) does to an index's cases: add, re-index, remove, refresh."""

    def _purge_pending(self) -> None:
        pending = [c.row for c in self.catalog.cases(status="pending") if c.row is not None]
        if pending:
            self._remove_rows(pending)
            self._save()

    def _checkpoint_when_due(self) -> None:
        """Checkpoint a build under way when CHECKPOINT_SECONDS have passed since the last one."""
        if time.monotonic() - self._last_checkpoint > CHECKPOINT_SECONDS:
            self.checkpoint()

    def _remove_rows(self, rows: list[int]) -> None:
        ids = self.catalog.item_ids(rows)
        present = np.intersect1d(ids, self.store.ids())
        with self.catalog.transaction():
            if len(present) and not self.store.remove(present):
                self.catalog.add_tombstones(present)
            self.catalog.delete_cases(rows)

    def add_sources(self, paths: Iterable[str], embedder: Embedder, progress: CaseProgress | None = None,
                    labels: dict[str, list[str]] | None = None, should_stop: Callable[[], bool] | None = None,
                    dicom: DicomOptions | None = None) -> BuildReport:
        """Index new volumes, refresh changed ones (checksum), skip unchanged ones; resumable.

        A path may also be a DICOM database (``ctkdb:PATH`` or the file) or a PACS (``dicomweb:URL``): its series that pass
        ``dicom``'s filters are indexed one by one (:meth:`_add_dicom_source`). ``labels``: a file's (absolute path) labels."""
        self._require_writer()
        self.check_model(embedder)
        began = time.monotonic()
        report = BuildReport()
        paths = list(paths)
        series = sum(self._add_dicom_source(spec, embedder, dicom or DicomOptions(), report, progress, should_stop)
                     for spec in [p for p in paths if is_dicom_source(p)])
        found = discover([p for p in paths if not is_dicom_source(p)])
        report.skipped.extend(found.skipped)
        labels = labels or {}
        self._add_cases(found.cases, embedder, lambda source: list(labels.get(os.path.abspath(source.path), [])), report,
                        progress, should_stop, total_if_none=series)
        report.seconds = time.monotonic() - began
        return report

    def add_cases(self, sources: Sequence[CaseSource], embedder: Embedder, labels_of: Callable[[CaseSource], list[str]],
                  progress: CaseProgress | None = None) -> BuildReport:
        """Index these cases (volume files, or DICOM series in a folder) as :meth:`add_sources` does, each with its labels;
        committed the same way: checkpoints, then the vector transform refitted when the index has grown."""
        self._require_writer()
        self.check_model(embedder)
        began = time.monotonic()
        report = BuildReport()
        self._add_cases(list(sources), embedder, labels_of, report, progress)
        report.seconds = time.monotonic() - began
        return report

    def _add_cases(self, cases: list[CaseSource], embedder: Embedder, labels_of: Callable[[CaseSource], list[str]],
                   report: BuildReport, progress: CaseProgress | None = None, should_stop: Callable[[], bool] | None = None,
                   total_if_none: int = 0) -> None:
        """The cases indexed one by one (the next read ahead), checkpointed as they go, then committed with the transform."""
        # The next case is checksummed and read on a thread while this one is embedded (file reading and decompression
        # release the GIL), so the model is not kept waiting between cases.
        from concurrent.futures import ThreadPoolExecutor

        known = self.known_checksums(cases)
        with ThreadPoolExecutor(1, thread_name_prefix="cbir-read") as reader:
            ahead = reader.submit(_load, cases[0], known) if cases else None
            for n, source in enumerate(cases):
                loaded, ahead = ahead, reader.submit(_load, cases[n + 1], known) if n + 1 < len(cases) else None
                if should_stop is not None and should_stop():
                    report.skipped.extend((s.label, "not reached (stopped)") for s in cases[n:])
                    break
                if progress is not None:
                    progress(n, len(cases), source.label)
                self._index_source(source, embedder, labels_of(source), report, loaded)
                self._checkpoint_when_due()
            if ahead is not None:
                ahead.cancel()
        self.commit()
        if progress is not None:
            total = len(cases) or total_if_none  # a build from a DICOM database or PACS only: its series
            progress(total, total, "done")

    def known_checksums(self, cases: Sequence[CaseSource]) -> dict[str, str | None]:
        """The checksum the index holds for each case (by case id; None for a case it does not hold)."""
        known = {}
        for source in cases:
            existing = self.catalog.case_by_id(case_id_for(source))
            known[case_id_for(source)] = existing.checksum if existing is not None else None
        return known

    def add_prepared(self, cases: Iterable[PreparedCase], total: int, progress: CaseProgress | None = None,
                     should_stop: Callable[[], bool] | None = None) -> BuildReport:
        """Store cases read and embedded elsewhere (Dask workers, :mod:`dask_build`) as they come, committed as
        :meth:`add_sources` commits: checkpoints as it goes, then the vector transform refitted when the index has grown."""
        self._require_writer()
        began = time.monotonic()
        report = BuildReport()
        done = 0
        for prepared in cases:
            if should_stop is not None and should_stop():
                break
            if prepared.model_digest not in (None, self.manifest["model"]["digest"]):
                raise ParameterError(f"{prepared.label}: embedded by another model ({prepared.model_digest}) than the index's "
                                     f"({self.manifest['model']['digest']}); the workers must load the index's model")
            self._store_prepared(prepared, report)
            done += 1
            if progress is not None:
                progress(done, total, prepared.label)
            self._checkpoint_when_due()
        self.checkpoint()
        self._maybe_refit_transform()
        if progress is not None:
            progress(total, total, "done")
        report.seconds = time.monotonic() - began
        return report

    def _add_dicom_source(self, spec: str, embedder: Embedder, options: DicomOptions, report: BuildReport,
                          progress: CaseProgress | None, should_stop: Callable[[], bool] | None) -> int:
        """Index the series of a DICOM database or a PACS: each fetched (PACS) only when no case holds its series UID yet,
        embedded, then its download removed (unless kept). A series that fails is one line in ``report.skipped``; the others
        go on, and a rerun fetches only what is still missing. Returns how many series passed the filters."""
        name, planned, close, notes = plan(spec, options)
        report.warnings.extend((name, note) for note in notes)
        try:
            for n, item in enumerate(planned):
                entry = item.entry
                label = f"{name} {entry.label}"
                if should_stop is not None and should_stop():
                    report.skipped.extend((f"{name} {p.entry.label}", "not reached (stopped)") for p in planned[n:])
                    break
                if progress is not None:
                    progress(n, len(planned), label)
                case_id = remote_case_id(name, entry.series_uid)
                elsewhere = [self.catalog.case_by_row(r) for r in self.catalog.case_rows_of_series(entry.series_uid)]
                if any(c.case_id != case_id or name.startswith("dicomweb:") for c in elsewhere):
                    report.unchanged.append(label)  # indexed already (here or from another source): never fetched twice
                    continue
                try:
                    source = item.obtain(should_stop)
                except (CBIRError, OSError) as error:
                    text = str(error)
                    report.skipped.append((label, text[len(entry.label) + 2:] if text.startswith(entry.label + ": ") else text))
                    continue
                try:
                    self._index_source(source, embedder, [], report, remote=name, label=label)
                finally:
                    item.release(source)
                self._checkpoint_when_due()
        finally:
            close()
        return len(planned)

    def _index_source(self, source: CaseSource, embedder: Embedder, labels: list[str], report: BuildReport,
                      loaded: Future[tuple[str, Volume | None]] | None = None, remote: str | None = None,
                      label: str | None = None) -> None:
        """Index one case (or note it unchanged or skipped, with why); ``loaded``: a future of its (checksum, volume);
        ``remote`` names a DICOM database or PACS it came from."""
        case_id = case_id_for(source) if remote is None else remote_case_id(remote, source.series_uid or "")
        existing = self.catalog.case_by_id(case_id)
        prepared = prepare_case(source, embedder, self.settings, labels, existing.checksum if existing is not None else None,
                                loaded, remote, label)
        self._store_prepared(prepared, report, existing)

    def _store_prepared(self, prepared: PreparedCase, report: BuildReport, existing: CaseRecord | None = None) -> None:
        """A prepared case into the index (replacing the case it was before), its header metadata kept as the index's
        privacy policy says; or noted unchanged or skipped."""
        if existing is None and not prepared.unchanged and not prepared.skipped:
            existing = self.catalog.case_by_id(prepared.case_id)
        if prepared.unchanged or (existing is not None and prepared.checksum is not None and existing.checksum == prepared.checksum):
            report.unchanged.append(prepared.label)
            return
        if prepared.skipped is not None or prepared.record is None or prepared.vectors is None:
            report.skipped.append((prepared.label, prepared.skipped or "not prepared"))
            return
        if prepared.warning:
            report.warnings.append((prepared.label, prepared.warning))
        if existing is not None and existing.row is not None:
            self._remove_rows([existing.row])
        record = dataclasses.replace(prepared.record, metadata={**privacy.private_metadata(prepared.header, self.privacy_policy),
                                                                 **prepared.record.metadata})
        self._store_case(record, prepared.items, prepared.vectors, prepared.digest, prepared.thumbnails)
        (report.replaced if existing is not None else report.added).append(prepared.label)
        report.vectors += len(prepared.items)

    def _store_case(self, record: CaseRecord, items: list[ItemRecord], vectors: np.ndarray, digest: str | None,
                    thumbnails: dict[tuple[str, int], np.ndarray] | None = None) -> int:
        """Insert a case, its items and thumbnails (pending) and add its vectors; the next checkpoint completes it."""
        with self.catalog.transaction():
            row = self.catalog.add_case(record, time.time())
            if digest:
                self.catalog.set_content(row, digest)
            ids = self.catalog.add_items(row, items)
            for (axis, plane), grey in (thumbnails or {}).items():
                self.catalog.add_thumbnail(row, axis, plane, grey)
        self.store.add(vectors, ids)
        self._pending_rows.append(row)
        return row

    def add_embedded(self, cases: Iterable[EmbeddedCase], progress: CaseProgress | None = None) -> BuildReport:
        """Store cases whose item vectors are already computed; a case id the index holds already is left unchanged.

        Committed like :meth:`add_sources` (checkpoints as it goes and at the end, the vector transform refitted when the
        index has grown), so a killed run resumes by adding the same cases again. Vectors of the wrong shape, not finite or
        not of unit length raise ParameterError naming the case; nothing of that case is stored.
        """
        self._require_writer()
        began = time.monotonic()
        report = BuildReport()
        listed = list(cases) if progress is not None else None
        total = len(listed) if listed is not None else 0
        for n, case in enumerate(listed if listed is not None else cases):
            record = case.record
            if progress is not None:
                progress(n, total, record.case_id)
            if self.catalog.case_by_id(record.case_id) is not None:
                report.unchanged.append(record.case_id)
                continue
            vectors = np.asarray(case.vectors)
            if vectors.ndim != 2 or vectors.shape != (len(case.items), self.store.dim):
                raise ParameterError(f"case {record.case_id}: {len(case.items)} items need ({len(case.items)}, {self.store.dim}) "
                                     f"vectors, got {vectors.shape}")
            bad = vector_problem(vectors) if len(vectors) else None
            if bad:
                raise ParameterError(f"case {record.case_id}: {bad}; not stored")
            record = dataclasses.replace(record, status="pending", row=None)
            self._store_case(record, [dataclasses.replace(item, id=None, case_row=None) for item in case.items],
                             vectors, case.content_digest)
            report.added.append(record.case_id)
            report.vectors += len(vectors)
            self._checkpoint_when_due()
        self.commit()
        if progress is not None:
            progress(total, total, "done")
        report.seconds = time.monotonic() - began
        return report

    def remove(self, case_ids: Iterable[str]) -> list[str]:
        """Remove cases by id (or by source path); returns the ids removed. Unknown ones raise InputError."""
        self._require_writer()
        rows, removed = [], []
        by_source = {c.source: c for c in self.catalog.cases()}
        for key in case_ids:
            case = self.catalog.case_by_id(key) or by_source.get(os.path.abspath(key))
            if case is None:
                raise InputError(key, f"is not a case of the index {self.folder}")
            if case.row is not None:
                rows.append(case.row)
            removed.append(case.case_id)
        self._remove_rows(rows)
        self._save()
        return removed

    def refresh(self, embedder: Embedder, progress: CaseProgress | None = None) -> BuildReport:
        """Re-check every case's source: re-index changed files, report missing ones."""
        report = BuildReport()
        present = []
        for case in self.catalog.cases():
            if is_remote_source(case.source):
                continue  # a database's or PACS's series: 'cbir index add SOURCE' picks up what is new there
            if os.path.exists(case.source):
                present.append(case.source)
            else:
                report.skipped.append((case.source, "source file is missing (kept in the index; remove it explicitly)"))
        result = self.add_sources(present, embedder, progress)
        result.skipped = report.skipped + result.skipped
        return result
