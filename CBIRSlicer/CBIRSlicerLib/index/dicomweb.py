"""A PACS over DICOMweb: QIDO-RS lists series (modality, study date range, body part), WADO-RS fetches one, streamed.

Through ``dicomweb-client`` (imported when used), with the credentials of :mod:`dicomweb_auth`. Every failure becomes a
:class:`SourceError` of one line that names the server or the series and the problem, without the credentials.

A server is not trusted: instances are asked for in the syntax they are stored in (``transfer-syntax=*``: a server that
cannot transcode, as Orthanc cannot for JPEG 2000, answers 500 to the default request) and decoded here by GDCM; a
listing must be DICOM JSON and is paged with care (:mod:`dicomweb_listing`); each listing page and each fetched instance
has a size and a time limit (:mod:`dicomweb_bounds`); non-image instances are never written to disk.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import urllib.parse
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..errors import JobCancelled, ParameterError, SourceError, printable
from .dicomweb_auth import PASSWORD_VARIABLE, TOKEN_VARIABLE, USER_VARIABLE, QuietLibrary, credentials, describe
from .dicomweb_bounds import LIMITS, SessionState, bounded_session
from .dicomweb_listing import (
    FIELDS,
    Listing,
    ListingShapeError,
    SeriesEntry,
    SeriesFilter,
    as_listing,
    check_uid,
    entry_of,
    page_through,
)

if TYPE_CHECKING:  # dicomweb-client loads with the first server spoken to
    from dicomweb_client.api import DICOMwebClient

PREFIX = "dicomweb:"
DEFAULT_TIMEOUT = 30.0  # seconds without a byte from the server before a request fails


class DicomWebServer:
    """A DICOMweb server at a URL (the root under which /studies and /series answer)."""

    def __init__(self, url: str, auth_file: str | None = None, timeout: float = DEFAULT_TIMEOUT):
        url = url[len(PREFIX):] if url.startswith(PREFIX) else url
        if not url.startswith(("http://", "https://")):
            raise ParameterError(f"dicomweb:{url}: expected dicomweb:http://HOST/PATH or dicomweb:https://HOST/PATH")
        parts = urllib.parse.urlsplit(url)
        if parts.username or parts.password:  # they would end up in the catalog, the shell history and process lists
            raise ParameterError(f"dicomweb:{parts.scheme}://...@{parts.hostname}: credentials in the URL are refused; set "
                                 f"{TOKEN_VARIABLE}, or {USER_VARIABLE} and {PASSWORD_VARIABLE}, or pass --auth-file")
        self.url = url.rstrip("/")
        self.timeout = float(timeout)
        self.auth = credentials(auth_file)
        self.limits = LIMITS
        self._client: DICOMwebClient | None = None
        self._state = SessionState()
        self.notes: list[str] = []  # what the user should know of how the last listing (series()) went

    @property
    def source(self) -> str:
        """The catalog's name for this server."""
        return PREFIX + self.url

    def client(self, instances: bool = False) -> DICOMwebClient:
        """The dicomweb-client client, made once (with the credentials, bounded answers, few quick retries), set up for
        listing pages or for instances."""
        if self._client is None:
            from dicomweb_client.api import DICOMwebClient

            session = bounded_session(self.limits, self.timeout, self._state)
            if "token" in self.auth:
                session.headers["Authorization"] = f"Bearer {self.auth['token']}"
            elif "user" in self.auth:
                session.auth = (self.auth["user"], self.auth["password"])
            self._client = DICOMwebClient(self.url, session=session, timeout=self.timeout)
            library = logging.getLogger(DICOMwebClient.__module__)  # "dicomweb_client.web": filters do not reach children
            if not any(isinstance(f, QuietLibrary) for f in library.filters):
                library.addFilter(QuietLibrary(self.auth))
            # A failed request (refused, timed out, 429, 503, 504) is tried once more, quickly; then it fails, named.
            self._client.set_http_retry_params(max_attempts=2, wait_exponential_multiplier=100)
        self._state.tripped = None
        self._state.instance = instances
        return self._client

    def _describe(self, error: BaseException) -> str:
        return describe(error, self.timeout, self.auth)

    def _page(self, ask: dict[str, str], offset: int, limit: int) -> list[Any]:
        return as_listing(self.client().search_for_series(search_filters=ask, fields=FIELDS, limit=limit, offset=offset or None))

    def series(self, wanted: SeriesFilter | None = None) -> list[SeriesEntry]:
        """The server's series that pass the filter (QIDO-RS; each modality asked for separately), by study then series UID;
        ``notes`` says what the user should know of how they were listed."""
        wanted = wanted or SeriesFilter()
        base: dict[str, str] = {}
        dates = wanted.qido_date()
        if dates:
            base["StudyDate"] = dates
        if wanted.body_part:
            base["BodyPartExamined"] = wanted.body_part
        asks = [{**base, "Modality": m} for m in wanted.modalities] or [base]
        listing = Listing()
        for ask in asks:
            try:
                page_through(functools.partial(self._page, ask), wanted, listing)
            except Exception as error:  # requests', the decoder's and the shape checks': all become one line
                raise SourceError(f"{self.source}: listing series failed: {self._describe(error)}") from None
        self.notes = list(dict.fromkeys(listing.notes))
        return sorted(listing.entries.values(), key=lambda e: (e.study_uid, e.series_uid))

    def entry(self, series_uid: str, study_uid: str | None = None) -> SeriesEntry:
        """One series as the server lists it now (its instance count, for progress); SourceError when it is gone."""
        try:
            check_uid(series_uid)
            if study_uid:
                check_uid(study_uid)
            answers = as_listing(self.client().search_for_series(study_instance_uid=study_uid or None,
                                                                 search_filters={"SeriesInstanceUID": series_uid}, fields=FIELDS))
            found = [e for e in map(entry_of, answers) if e is not None and e.series_uid == series_uid]
        except Exception as error:
            raise SourceError(f"series {printable(str(series_uid))[:80]}: looking it up on {self.source} failed: "
                              f"{self._describe(error)}") from None
        if found:
            return found[0]
        raise SourceError(f"series {series_uid}: not on {self.source} (deleted since it was indexed?)")

    def fetch(self, entry: SeriesEntry, folder: str, progress: Callable[[int, int | None], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> list[str]:
        """Fetch a series (WADO-RS, streamed, in the syntax it is stored in) into ``folder``, one file per image instance;
        all or nothing.

        The instances go to a hidden folder beside it first, which becomes ``folder`` only when every instance the listing
        promised has come, so a half-fetched series never looks fetched. Instances without pixels (reports, presentation
        states, key objects: they carry patient names) are counted and never written. Raises SourceError (one line) or
        JobCancelled.
        """
        try:  # before any path is touched: the series UID names the folder
            check_uid(entry.study_uid)
            check_uid(entry.series_uid)
        except ListingShapeError as error:
            raise SourceError(f"{entry.label}: not fetched: {error}") from None
        partial = os.path.join(os.path.dirname(os.path.abspath(folder)), "." + os.path.basename(folder) + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        count = images = 0
        try:
            # '*': as stored. The default asks the server to transcode to Explicit VR Little Endian, which not every server
            # can (Orthanc answers 500 for JPEG 2000); GDCM decodes JPEG 2000, JPEG-LS, JPEG, RLE and deflate here.
            # (A server that sends a bare instance instead of a multipart answer is read all the same: the client's
            # two-line warning about it says nothing a user can act on.)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*not compliant with the DICOM standard", category=UserWarning)
                for dataset in self.client(instances=True).iter_series(entry.study_uid, entry.series_uid,
                                                                        media_types=(("application/dicom", "*"),)):
                    if should_stop is not None and should_stop():
                        raise JobCancelled(f"{entry.label}: fetch cancelled")
                    count += 1
                    if str(dataset.get("SeriesInstanceUID", "")) != entry.series_uid:
                        raise SourceError(f"{entry.label}: the server sent an instance of another series")
                    if not any(k in dataset for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
                        continue  # not an image
                    dataset.save_as(os.path.join(partial, f"{images:05d}.dcm"), enforce_file_format=True)
                    images += 1
                    if progress is not None:
                        progress(count, entry.instances)
            if count == 0:
                raise SourceError(f"{entry.label}: the server sent no instances (deleted since it was listed?)")
            if entry.instances is not None and count != entry.instances:
                raise SourceError(f"{entry.label}: received {count} of the {entry.instances} instances the listing promised")
            if images == 0:
                raise SourceError(f"{entry.label}: none of its {count} instance(s) is an image (reports or other objects "
                                  "without pixels)")
        except (SourceError, JobCancelled):
            shutil.rmtree(partial, ignore_errors=True)
            raise
        except Exception as error:  # requests', urllib3's, the multipart decoder's and the limits': one line naming the series
            shutil.rmtree(partial, ignore_errors=True)
            raise SourceError(f"{entry.label}: fetch failed after {count} instance(s): {self._describe(error)}") from None
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
        return sorted(os.path.join(folder, name) for name in os.listdir(folder))
