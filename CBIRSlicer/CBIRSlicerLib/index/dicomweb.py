"""A PACS over DICOMweb: QIDO-RS lists series (modality, study date range, body part), WADO-RS fetches one, streamed.

Through ``dicomweb-client`` (imported when used). Credentials never come from the command line: a bearer token from
``CBIR_DICOMWEB_TOKEN``, or basic auth from ``CBIR_DICOMWEB_USER`` + ``CBIR_DICOMWEB_PASSWORD``, or an auth file (JSON
``{"token": ...}`` or ``{"user": ..., "password": ...}``). Every failure becomes a :class:`SourceError` of one line that
names the series and the problem, with the credentials taken out of it.

A server is not trusted: instances are asked for in the syntax they are stored in (``transfer-syntax=*``: a server that
cannot transcode, as Orthanc cannot for JPEG 2000, answers 500 to the default request) and decoded here by GDCM; a
listing must be DICOM JSON, pages until a page brings nothing new and stops after :data:`MAX_LISTING_PAGES`; each
listing page and each fetched instance has a size and a time limit (:class:`Limits`), so a body that never ends cannot
hang a build, whatever ``--timeout`` (which counts only silence) says; non-image instances are never written to disk.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
import os
import re
import shutil
import socket
import threading
import urllib.parse
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InputError, JobCancelled, ParameterError, SourceError, printable

PREFIX = "dicomweb:"
TOKEN_VARIABLE = "CBIR_DICOMWEB_TOKEN"
USER_VARIABLE, PASSWORD_VARIABLE = "CBIR_DICOMWEB_USER", "CBIR_DICOMWEB_PASSWORD"
DEFAULT_TIMEOUT = 30.0  # seconds without a byte from the server before a request fails

# Where a listing stops: a server that ignores 'offset' repeats its first page (caught at once: nothing new), one that
# invents new series forever is stopped here. A page of 1,000 series is about 1 MB of DICOM JSON.
LISTING_PAGE = 1000
MAX_LISTING_PAGES = 10_000
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # DICOM's rule (PS3.5 9.1); a UID also names a folder of downloads

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


@dataclass(frozen=True)
class Limits:
    """How much a server may send before it is cut off: per listing page and per fetched instance, in bytes and in
    seconds (``timeout_factor`` times ``--timeout``: a listing page or an instance taking ten times the silence a request
    may keep is not coming). A CT instance is about 0.5 MB; a 1 GiB instance would be a multi-frame series of ~2,000
    512 x 512 frames."""

    listing_bytes: int = 64 * 2**20
    instance_bytes: int = 2**30
    timeout_factor: float = 10.0


LIMITS = Limits()


def _credential(value: object, where: str, key: str) -> str:
    """A credential as a string an HTTP header can carry; refused (never echoed) when it is not one."""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise InputError(where, f'"{key}" must be a string')
    text = str(value)
    # A line break or another control character in a header value is a header injection; requests would refuse it with
    # a message that quotes the value (the secret) in full.
    if not text.isprintable() or not all(ord(c) < 0x100 for c in text):
        raise InputError(where, f'"{key}" holds a line break, a control character or a character outside Latin-1; an HTTP '
                                "header cannot carry it (the value is not shown)")
    return text


def credentials(auth_file: str | None = None) -> dict:
    """{'token': ...} or {'user': ..., 'password': ...} from the auth file or the environment; {} for none."""
    if auth_file:
        try:
            with open(auth_file, encoding="utf-8") as handle:
                found = json.load(handle)
        except OSError as error:
            raise InputError(auth_file, f"cannot be read ({error.strerror})") from None
        except (ValueError, RecursionError):  # RecursionError: JSON nested thousands deep
            raise InputError(auth_file, 'is not JSON; write {"token": "..."} or {"user": "...", "password": "..."}') from None
        if not isinstance(found, dict) or not (found.get("token") or (found.get("user") and "password" in found)):
            raise InputError(auth_file, 'holds neither "token" nor "user" and "password"')
        return {k: _credential(found[k], auth_file, k) for k in ("token", "user", "password") if k in found}
    if os.environ.get(TOKEN_VARIABLE):
        return {"token": _credential(os.environ[TOKEN_VARIABLE], TOKEN_VARIABLE, "token")}
    if os.environ.get(USER_VARIABLE):
        return {"user": _credential(os.environ[USER_VARIABLE], USER_VARIABLE, "user"),
                "password": _credential(os.environ.get(PASSWORD_VARIABLE, ""), PASSWORD_VARIABLE, "password")}
    return {}


class ListingShapeError(ValueError):
    """A server's listing is not DICOM JSON as QIDO-RS defines it."""


def _kind(value: object) -> str:
    """What a JSON value is, in JSON's words."""
    names = {str: "a string", bool: "a boolean", int: "a number", float: "a number", dict: "an object", list: "an array"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _value(attributes: dict, tag: str) -> str | None:
    """An attribute's first value as text (control characters escaped), None when absent; ListingShapeError when the
    server sent something that is not a DICOM JSON attribute."""
    element = attributes.get(tag)
    if element is None:
        return None
    if not isinstance(element, dict):
        raise ListingShapeError(f"attribute {tag} is {_kind(element)}, not an object")
    values = element.get("Value")
    if values is None or values == []:
        return None
    if not isinstance(values, list):
        raise ListingShapeError(f'attribute {tag} has a "Value" that is {_kind(values)}, not an array')
    first = values[0]
    if isinstance(first, dict):  # a person name: {"Alphabetic": ...}
        first = first.get("Alphabetic")
    if first is None:
        return None
    if not isinstance(first, (str, int, float)) or isinstance(first, bool):
        raise ListingShapeError(f"attribute {tag} has a value that is {_kind(first)}")
    return printable(str(first).strip()[:1024])


def _entry(attributes: object) -> SeriesEntry | None:
    """A listed series as an entry, None when it lacks its UIDs; ListingShapeError when it is not DICOM JSON."""
    if not isinstance(attributes, dict):
        raise ListingShapeError(f"a listed series is {_kind(attributes)}, not an object")
    study, series = _value(attributes, _STUDY_UID), _value(attributes, _SERIES_UID)
    if not study or not series:
        return None
    for uid in (study, series):
        check_uid(uid)
    count = _value(attributes, _INSTANCES)
    return SeriesEntry(study, series, _value(attributes, _MODALITY), _value(attributes, _BODY_PART), _value(attributes, _STUDY_DATE),
                       _value(attributes, _DESCRIPTION), int(count) if count and count.isdigit() and len(count) <= 9 else None)


def check_uid(uid: str) -> str:
    """The UID, when it is one (digits and dots, at most 64 characters: it also names a folder); ListingShapeError if not."""
    if not isinstance(uid, str) or len(uid) > 64 or not _UID.fullmatch(uid):
        raise ListingShapeError(f"'{printable(str(uid))[:80]}' is not a DICOM UID (digits and dots, at most 64)")
    return uid


def _listing(answer: object) -> list:
    if not isinstance(answer, list):
        raise ListingShapeError(f"the answer is {_kind(answer)}, not an array of series (DICOM JSON)")
    return answer


class BodyLimitError(OSError):
    """A server kept sending past a listing page's or an instance's limit (bytes or time) and was cut off."""


def redact(text: str, secrets: dict) -> str:
    """The text without the credentials: their values, basic auth's base64 form, and whatever follows 'Bearer' or 'Basic'
    (an HTTP library quotes a header it refuses in full)."""
    hidden = [v for v in secrets.values() if v and len(v) >= 3]
    if secrets.get("user") is not None:
        hidden.append(base64.b64encode(f"{secrets['user']}:{secrets.get('password', '')}".encode("latin-1")).decode())
    for value in sorted(hidden, key=len, reverse=True):
        text = text.replace(value, "***")
    return re.sub(r"(?i)\b(bearer|basic)(\s+|=|:\s*)[^\s'\",;]+", r"\1\2***", text)


def describe(error: BaseException, timeout: float, secrets: dict | None = None) -> str:
    """One line for what went wrong talking to the server (no credentials in it, control characters escaped)."""
    return printable(redact(_describe(error, timeout), secrets or {}))


def _describe(error: BaseException, timeout: float) -> str:
    import requests

    if isinstance(error, (BodyLimitError, ListingShapeError)):
        return str(error)
    if isinstance(error, requests.HTTPError) and error.response is not None:
        code = error.response.status_code
        if code in (401, 403):
            return (f"HTTP {code}: the server refused the credentials (set {TOKEN_VARIABLE}, or {USER_VARIABLE} and "
                    f"{PASSWORD_VARIABLE}, or pass --auth-file)")
        if code == 404:
            return "HTTP 404: not on the server (deleted since it was listed?)"
        return f"HTTP {code} {str(error.response.reason or '')[:80]}".rstrip() + " from the server"
    if isinstance(error, RecursionError):
        return "the answer could not be read (JSON nested too deep)"
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


class _QuietLibrary(logging.Filter):
    """dicomweb-client logs a server's Warning header as it came (Python prints it when nothing else is set up): shown
    as one line, control characters escaped, and never a credential."""

    def __init__(self, secrets: dict):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = printable(redact(record.getMessage(), self.secrets)), ()
        return record.levelno >= logging.WARNING


class _Watch:
    """Cuts a response off when its body (or, for a multipart answer, its current part) runs past the time allowed: the
    socket is shut down from a timer, which ends a read that a trickling server would otherwise keep alive forever."""

    def __init__(self, response, seconds: float):
        self.response, self.seconds = response, seconds
        self.expired = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def restart(self) -> None:
        """Give the body (or the next part) its full time again."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.seconds, self._expire)
            self._timer.daemon = True
            self._timer.start()

    def stop(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _expire(self) -> None:
        with self._lock:  # under the lock: stop() has not run, so the response and its socket are still this one's
            if self._timer is None:
                return
            self.expired = True
            try:
                with socket.socket(fileno=os.dup(self.response.raw.fileno())) as sock:
                    sock.shutdown(socket.SHUT_RDWR)
            except (OSError, ValueError, AttributeError):
                pass  # already closed: the read ends by itself


def _bounded(response, what: str, max_bytes: int, seconds: float, on_trip: Callable[[str], None]) -> None:
    """Make ``response.iter_content`` (through which requests reads every body, ``.content`` included) stop with
    BodyLimitError past ``max_bytes`` or ``seconds``: for the whole body, or for each part of a multipart answer."""
    content_type = response.headers.get("Content-Type", "")
    boundary = re.search(r'(?i)boundary="?([^";]+)"?', content_type) if "multipart" in content_type.lower() else None
    marker = b"--" + boundary.group(1).encode("latin-1", "replace") if boundary else None
    original = response.iter_content

    def trip(text: str) -> BodyLimitError:
        on_trip(text)
        return BodyLimitError(text)

    def iter_content(chunk_size=1, decode_unicode=False):
        watch = _Watch(response, seconds)
        size, tail = 0, b""
        too_slow = f"the server kept sending {what} for more than {seconds:g} s; cut off"
        watch.restart()
        try:
            for chunk in original(chunk_size, decode_unicode):
                if watch.expired:
                    raise trip(too_slow)
                size += len(chunk)
                if marker is not None:  # a new part begins: it has the whole limit again
                    window = tail + chunk
                    at = window.rfind(marker)
                    if at >= 0:
                        size = len(window) - at - len(marker)
                        watch.restart()
                    tail = window[-(len(marker) - 1):]
                if size > max_bytes:
                    raise trip(f"the server sent {what} of more than {max_bytes / 2**20:g} MiB; cut off")
                yield chunk
        except BodyLimitError:
            raise
        except Exception:
            if watch.expired:
                raise trip(too_slow) from None
            raise
        finally:
            watch.stop()
        if watch.expired:  # the timer's shutdown ended the body early: it did not end by itself
            raise trip(too_slow)

    response.iter_content = iter_content


def _bounded_session(limits: Limits, timeout: float):
    """A requests session whose every answer is bounded (:func:`_bounded`); once one was cut off, the client's quick retry
    of the same request fails at once instead of waiting out the limit again."""
    import requests

    class BoundedSession(requests.Session):
        tripped: str | None = None
        instance = False  # what the next answers are: listing pages or instances (set by DicomWebServer)

        def request(self, method, url, *args, **kwargs):
            if self.tripped:
                raise BodyLimitError(self.tripped)
            stream = kwargs.pop("stream", False)
            response = super().request(method, url, *args, stream=True, **kwargs)
            what, max_bytes = ("an instance", limits.instance_bytes) if self.instance else ("a listing page", limits.listing_bytes)
            _bounded(response, what, max_bytes, limits.timeout_factor * timeout, lambda text: setattr(self, "tripped", text))
            if not stream:
                response.content  # noqa: B018 (read now, through the bounds, as requests would have)
            return response

    return BoundedSession()


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
        self._client = None
        self._session = None

    @property
    def source(self) -> str:
        """The catalog's name for this server."""
        return PREFIX + self.url

    def client(self, instances: bool = False):
        """The dicomweb-client client, made once (with the credentials, bounded answers, few quick retries), set up for
        listing pages or for instances."""
        if self._client is None:
            from dicomweb_client.api import DICOMwebClient

            session = _bounded_session(self.limits, self.timeout)
            if "token" in self.auth:
                session.headers["Authorization"] = f"Bearer {self.auth['token']}"
            elif "user" in self.auth:
                session.auth = (self.auth["user"], self.auth["password"])
            self._session = session
            self._client = DICOMwebClient(self.url, session=session, timeout=self.timeout)
            library = logging.getLogger(DICOMwebClient.__module__)  # "dicomweb_client.web": filters do not reach children
            if not any(isinstance(f, _QuietLibrary) for f in library.filters):
                library.addFilter(_QuietLibrary(self.auth))
            # A failed request (refused, timed out, 429, 503, 504) is tried once more, quickly; then it fails, named.
            self._client.set_http_retry_params(max_attempts=2, wait_exponential_multiplier=100)
        self._session.tripped = None
        self._session.instance = instances
        return self._client

    def _describe(self, error: BaseException) -> str:
        return describe(error, self.timeout, self.auth)

    def _page(self, ask: dict, offset: int, study_uid: str | None = None) -> list:
        return _listing(self.client().search_for_series(study_instance_uid=study_uid, search_filters=ask, fields=_FIELDS,
                                                        limit=LISTING_PAGE, offset=offset or None))

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
            seen: set[str] = set()
            offset, pages = 0, 0
            try:
                while True:
                    page = self._page(ask, offset)
                    entries = [e for e in map(_entry, page) if e is not None]
                    new = [e for e in entries if e.series_uid not in seen]
                    if not new:  # the end, or a server that ignores 'offset' and sends its first page again
                        break
                    pages += 1
                    if pages > MAX_LISTING_PAGES:
                        raise ListingShapeError(f"the server kept paging past {MAX_LISTING_PAGES} pages of {LISTING_PAGE} "
                                                "series; refused (narrow the listing with --modality or --study-date)")
                    seen.update(e.series_uid for e in new)
                    found.update((e.series_uid, e) for e in new if wanted.matches(e))
                    offset += len(page)
            except Exception as error:  # requests', the decoder's and the shape checks': all become one line
                raise SourceError(f"{self.source}: listing series failed: {self._describe(error)}") from None
        return sorted(found.values(), key=lambda e: (e.study_uid, e.series_uid))

    def entry(self, series_uid: str, study_uid: str | None = None) -> SeriesEntry:
        """One series as the server lists it now (its instance count, for progress); SourceError when it is gone."""
        try:
            check_uid(series_uid)
            if study_uid:
                check_uid(study_uid)
            answers = _listing(self.client().search_for_series(study_instance_uid=study_uid or None,
                                                               search_filters={"SeriesInstanceUID": series_uid}, fields=_FIELDS))
            found = [e for e in map(_entry, answers) if e is not None and e.series_uid == series_uid]
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
