"""A DICOMweb server's credentials, and its failures told in one line without them.

Credentials never come from the command line: a bearer token from ``CBIR_DICOMWEB_TOKEN``, or basic auth from
``CBIR_DICOMWEB_USER`` + ``CBIR_DICOMWEB_PASSWORD``, or an auth file (JSON ``{"token": ...}`` or ``{"user": ...,
"password": ...}``); a value an HTTP header cannot carry is refused without being shown. Every failure talking to the
server becomes one line (:func:`describe`) with the credentials taken out of it (:func:`redact`), control characters
escaped; so does the HTTP library's log of a server's Warning header.
"""

from __future__ import annotations

import base64
import logging
import os
import re

from ..errors import InputError, printable
from .auth_file import read_auth_file
from .dicomweb_bounds import BodyLimitError
from .dicomweb_listing import ListingShapeError

TOKEN_VARIABLE = "CBIR_DICOMWEB_TOKEN"
USER_VARIABLE, PASSWORD_VARIABLE = "CBIR_DICOMWEB_USER", "CBIR_DICOMWEB_PASSWORD"


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


def credentials(auth_file: str | None = None) -> dict[str, str]:
    """{'token': ...} or {'user': ..., 'password': ...} from the auth file or the environment; {} for none."""
    if auth_file:
        return read_auth_file(auth_file, _credential)
    if os.environ.get(TOKEN_VARIABLE):
        return {"token": _credential(os.environ[TOKEN_VARIABLE], TOKEN_VARIABLE, "token")}
    if os.environ.get(USER_VARIABLE):
        return {"user": _credential(os.environ[USER_VARIABLE], USER_VARIABLE, "user"),
                "password": _credential(os.environ.get(PASSWORD_VARIABLE, ""), PASSWORD_VARIABLE, "password")}
    return {}


def redact(text: str, secrets: dict[str, str]) -> str:
    """The text without the credentials: their values, basic auth's base64 form, and whatever follows 'Bearer' or 'Basic'
    (an HTTP library quotes a header it refuses in full)."""
    hidden = [v for v in secrets.values() if v and len(v) >= 3]
    if secrets.get("user") is not None:
        hidden.append(base64.b64encode(f"{secrets['user']}:{secrets.get('password', '')}".encode("latin-1")).decode())
    for value in sorted(hidden, key=len, reverse=True):
        text = text.replace(value, "***")
    return re.sub(r"(?i)\b(bearer|basic)(\s+|=|:\s*)[^\s'\",;]+", r"\1\2***", text)


def describe(error: BaseException, timeout: float, secrets: dict[str, str] | None = None) -> str:
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


class QuietLibrary(logging.Filter):
    """dicomweb-client logs a server's Warning header as it came (Python prints it when nothing else is set up): shown
    as one line, control characters escaped, and never a credential."""

    def __init__(self, secrets: dict[str, str]):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = printable(redact(record.getMessage(), self.secrets)), ()
        return record.levelno >= logging.WARNING
