"""A PACS over DICOMweb: QIDO-RS lists series (modality, study date range, body part), WADO-RS fetches one, streamed.

Through ``dicomweb-client`` (imported when used). Credentials never come from the command line: a bearer token from
``CBIR_DICOMWEB_TOKEN``, or basic auth from ``CBIR_DICOMWEB_USER`` + ``CBIR_DICOMWEB_PASSWORD``, or an auth file (JSON
``{"token": ...}`` or ``{"user": ..., "password": ...}``). Every failure becomes a :class:`SourceError` of one line that
names the series and the problem.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InputError, JobCancelled, ParameterError, SourceError

PREFIX = "dicomweb:"
TOKEN_VARIABLE = "CBIR_DICOMWEB_TOKEN"
USER_VARIABLE, PASSWORD_VARIABLE = "CBIR_DICOMWEB_USER", "CBIR_DICOMWEB_PASSWORD"
DEFAULT_TIMEOUT = 30.0  # seconds without a byte from the server before a request fails

# QIDO attribute tags (DICOM JSON model keys).
_STUDY_UID, _SERIES_UID, _MODALITY, _BODY_PART = "0020000D", "0020000E", "00080060", "00180015"
_STUDY_DATE, _DESCRIPTION, _INSTANCES = "00080020", "0008103E", "00201209"
_FIELDS = ["StudyDate", "BodyPartExamined", "SeriesDescription", "NumberOfSeriesRelatedInstances", "Modality"]


@dataclass(frozen=True)
class SeriesEntry:
    """One series a DICOM database or a PACS lists: its UIDs and what the listing says about it."""

    study_uid: str
    series_uid: str
    modality: str | None = None
    body_part: str | None = None
    study_date: str | None = None
    description: str | None = None
    instances: int | None = None

    @property
    def label(self) -> str:
        """How messages name it: the series UID, with its description when there is one."""
        return f"series {self.series_uid}" + (f" ({self.description})" if self.description else "")


@dataclass(frozen=True)
class SeriesFilter:
    """Which series to index: modalities (any of), a study date range (DICOM dates, inclusive, open ends), a body part."""

    modalities: tuple[str, ...] = ()
    date_from: str | None = None
    date_to: str | None = None
    body_part: str | None = None

    def matches(self, entry: SeriesEntry) -> bool:
        """Whether a listed series passes (a value the listing lacks passes: the server filtered on it, or cannot)."""
        if self.modalities and entry.modality and entry.modality.upper() not in {m.upper() for m in self.modalities}:
            return False
        if self.body_part and entry.body_part and entry.body_part.upper() != self.body_part.upper():
            return False
        if entry.study_date and self.date_from and entry.study_date < self.date_from:
            return False
        return not (entry.study_date and self.date_to and entry.study_date > self.date_to)

    def qido_date(self) -> str | None:
        """The study date range as QIDO-RS writes it (DICOM range matching), or None."""
        if not (self.date_from or self.date_to):
            return None
        if self.date_from == self.date_to:
            return self.date_from
        return f"{self.date_from or ''}-{self.date_to or ''}"


def _date(text: str, what: str) -> str:
    digits = text.replace("-", "") if len(text) == 10 else text  # 2024-01-31 or 20240131
    try:
        if len(digits) != 8 or not digits.isdigit():
            raise ValueError(text)
        datetime.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        raise ParameterError(f"{what} '{text}': expected a date as YYYYMMDD or YYYY-MM-DD") from None
    return digits


def parse_date_range(text: str | None) -> tuple[str | None, str | None]:
    """'20240101-20241231', '2024-01-01..2024-12-31', '20240101-' or '-20241231', or one date: (from, to) as YYYYMMDD."""
    if not text:
        return None, None
    text = text.strip()
    if ".." in text:
        low, high = text.split("..", 1)
    elif len(text) in (8, 10) and (text.isdigit() or text.count("-") == 2):
        low = high = text
    elif text.count("-") == 1:
        low, high = text.split("-", 1)
    else:
        raise ParameterError(f"--study-date '{text}': expected FROM-TO as YYYYMMDD-YYYYMMDD (either end may be left out)")
    found = (_date(low, "--study-date") if low else None, _date(high, "--study-date") if high else None)
    if found[0] and found[1] and found[0] > found[1]:
        raise ParameterError(f"--study-date '{text}': the range ends before it begins")
    return found


def credentials(auth_file: str | None = None) -> dict:
    """{'token': ...} or {'user': ..., 'password': ...} from the auth file or the environment; {} for none."""
    if auth_file:
        try:
            with open(auth_file, encoding="utf-8") as handle:
                found = json.load(handle)
        except OSError as error:
            raise InputError(auth_file, f"cannot be read ({error.strerror})") from None
        except ValueError:
            raise InputError(auth_file, 'is not JSON; write {"token": "..."} or {"user": "...", "password": "..."}') from None
        if not isinstance(found, dict) or not (found.get("token") or (found.get("user") and "password" in found)):
            raise InputError(auth_file, 'holds neither "token" nor "user" and "password"')
        return {k: str(found[k]) for k in ("token", "user", "password") if k in found}
    if os.environ.get(TOKEN_VARIABLE):
        return {"token": os.environ[TOKEN_VARIABLE]}
    if os.environ.get(USER_VARIABLE):
        return {"user": os.environ[USER_VARIABLE], "password": os.environ.get(PASSWORD_VARIABLE, "")}
    return {}


def _value(attributes: dict, tag: str) -> str | None:
    values = (attributes.get(tag) or {}).get("Value") or []
    return str(values[0]).strip() if values and values[0] is not None else None


def describe(error: BaseException, timeout: float) -> str:
    """One line for what went wrong talking to the server."""
    import requests

    if isinstance(error, requests.HTTPError) and error.response is not None:
        code = error.response.status_code
        if code in (401, 403):
            return (f"HTTP {code}: the server refused the credentials (set {TOKEN_VARIABLE}, or {USER_VARIABLE} and "
                    f"{PASSWORD_VARIABLE}, or pass --auth-file)")
        if code == 404:
            return "HTTP 404: not on the server (deleted since it was listed?)"
        return f"HTTP {code} {error.response.reason or ''}".rstrip() + " from the server"
    if isinstance(error, requests.Timeout):
        return f"no answer within {timeout:g} s (timeout)"
    if isinstance(error, requests.ConnectionError):
        cause = str(error)
        if "Connection refused" in cause or "Max retries" in cause or "NewConnectionError" in cause:
            return "server unreachable (connection refused: is it running?)"
        return "the connection broke during the transfer"
    if isinstance(error, (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError)):
        return "the transfer was cut off midway"
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"the answer could not be read ({text[:160]})"


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
        self._client = None

    @property
    def source(self) -> str:
        """The catalog's name for this server."""
        return PREFIX + self.url

    def client(self):
        """The dicomweb-client client, made once (with the credentials; few quick retries)."""
        if self._client is None:
            import requests
            from dicomweb_client.api import DICOMwebClient

            session = requests.Session()
            if "token" in self.auth:
                session.headers["Authorization"] = f"Bearer {self.auth['token']}"
            elif "user" in self.auth:
                session.auth = (self.auth["user"], self.auth["password"])
            self._client = DICOMwebClient(self.url, session=session, timeout=self.timeout)
            # A failed request (refused, timed out, 429, 503, 504) is tried once more, quickly; then it fails, named.
            self._client.set_http_retry_params(max_attempts=2, wait_exponential_multiplier=100)
        return self._client

    def series(self, wanted: SeriesFilter | None = None) -> list[SeriesEntry]:
        """The server's series that pass the filter (QIDO-RS; each modality asked for separately), by study then series UID."""
        wanted = wanted or SeriesFilter()
        base = {}
        if wanted.qido_date():
            base["StudyDate"] = wanted.qido_date()
        if wanted.body_part:
            base["BodyPartExamined"] = wanted.body_part
        asks = [{**base, "Modality": m} for m in wanted.modalities] or [base]
        found: dict[str, SeriesEntry] = {}
        for ask in asks:
            try:
                answers = self.client().search_for_series(search_filters=ask, fields=_FIELDS, get_remaining=True)
            except Exception as error:  # requests' and the decoder's: all become one line
                raise SourceError(f"{self.source}: listing series failed: {describe(error, self.timeout)}") from None
            for attributes in answers:
                study, series = _value(attributes, _STUDY_UID), _value(attributes, _SERIES_UID)
                if not study or not series:
                    continue
                count = _value(attributes, _INSTANCES)
                entry = SeriesEntry(study, series, _value(attributes, _MODALITY), _value(attributes, _BODY_PART),
                                    _value(attributes, _STUDY_DATE), _value(attributes, _DESCRIPTION),
                                    int(count) if count and count.isdigit() else None)
                if wanted.matches(entry):
                    found[series] = entry
        return sorted(found.values(), key=lambda e: (e.study_uid, e.series_uid))

    def entry(self, series_uid: str, study_uid: str | None = None) -> SeriesEntry:
        """One series as the server lists it now (its instance count, for progress); SourceError when it is gone."""
        try:
            answers = self.client().search_for_series(study_instance_uid=study_uid, search_filters={"SeriesInstanceUID": series_uid},
                                                      fields=_FIELDS)
        except Exception as error:
            raise SourceError(f"series {series_uid}: looking it up on {self.source} failed: {describe(error, self.timeout)}") from None
        for attributes in answers:
            if _value(attributes, _SERIES_UID) == series_uid and _value(attributes, _STUDY_UID):
                count = _value(attributes, _INSTANCES)
                return SeriesEntry(_value(attributes, _STUDY_UID), series_uid, _value(attributes, _MODALITY),
                                   _value(attributes, _BODY_PART), _value(attributes, _STUDY_DATE), _value(attributes, _DESCRIPTION),
                                   int(count) if count and count.isdigit() else None)
        raise SourceError(f"series {series_uid}: not on {self.source} (deleted since it was indexed?)")

    def fetch(self, entry: SeriesEntry, folder: str, progress: Callable[[int, int | None], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> list[str]:
        """Fetch a series (WADO-RS, streamed) into ``folder``, one file per instance; all or nothing.

        The instances go to a hidden folder beside it first, which becomes ``folder`` only when every instance the listing
        promised has come, so a half-fetched series never looks fetched. Raises SourceError (one line) or JobCancelled.
        """
        partial = os.path.join(os.path.dirname(os.path.abspath(folder)), "." + os.path.basename(folder) + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
        count = 0
        try:
            for dataset in self.client().iter_series(entry.study_uid, entry.series_uid):
                if should_stop is not None and should_stop():
                    raise JobCancelled(f"{entry.label}: fetch cancelled")
                dataset.save_as(os.path.join(partial, f"{count:05d}.dcm"), enforce_file_format=True)
                count += 1
                if progress is not None:
                    progress(count, entry.instances)
            if count == 0:
                raise SourceError(f"{entry.label}: the server sent no instances (deleted since it was listed?)")
            if entry.instances is not None and count != entry.instances:
                raise SourceError(f"{entry.label}: received {count} of the {entry.instances} instances the listing promised")
        except (SourceError, JobCancelled):
            shutil.rmtree(partial, ignore_errors=True)
            raise
        except Exception as error:  # requests', urllib3's and the multipart decoder's: one line naming the series
            shutil.rmtree(partial, ignore_errors=True)
            raise SourceError(f"{entry.label}: fetch failed after {count} instance(s): {describe(error, self.timeout)}") from None
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
        return sorted(os.path.join(folder, name) for name in os.listdir(folder))
