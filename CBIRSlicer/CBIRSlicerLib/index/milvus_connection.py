"""Where a Milvus-backed index lives and how to speak to it: the location, the credentials, and calls that ride out a
server restart.

Locations::

    milvus://HOST[:PORT]/COLLECTION          a Milvus server (standalone or cluster; port 19530 by default)
    milvus+https://HOST[:PORT]/COLLECTION    the same over TLS
    milvus:///PATH/NAME.db[?collection=C]     a milvus-lite file (the same engine embedded; one process at a time)
    PATH/NAME.db                              the same, as a plain path

The collection name is the index's name: its items live in ``COLLECTION`` and its cases, thumbnails and records in
``COLLECTION_cases``, ``COLLECTION_thumbnails`` and ``COLLECTION_meta`` (:mod:`milvus_catalog`); a file's default is
``cbir``.

Credentials never travel on the command line or in a location (they would land in shell history, saved searches and
logs): a token from ``CBIR_MILVUS_TOKEN``, or ``CBIR_MILVUS_USER`` and ``CBIR_MILVUS_PASSWORD``, or a JSON file named by
``CBIR_MILVUS_AUTH_FILE`` (``{"token": ...}`` or ``{"user": ..., "password": ...}``). A location with ``user:password@``
in it is refused.

Every call goes through :meth:`MilvusConnection.call`: a server that does not answer (restarting, a network blip) is
asked again with growing pauses for ``CBIR_MILVUS_RETRY_SECONDS`` (60 by default), then the call fails with one line
naming the server. Writes are upserts by primary key, so a write repeated after a lost answer stores nothing twice.
pymilvus's own error logging (tracebacks on every retry) and gRPC's are silenced: the one line is ours.
"""

from __future__ import annotations

import logging
import os
import re
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import InputError, ParameterError, StoreUnavailableError
from .auth_file import read_auth_file

T = TypeVar("T")

SCHEMES = ("milvus://", "milvus+https://")
DEFAULT_PORT = 19530
DEFAULT_COLLECTION = "cbir"
TOKEN_VARIABLE, USER_VARIABLE, PASSWORD_VARIABLE = "CBIR_MILVUS_TOKEN", "CBIR_MILVUS_USER", "CBIR_MILVUS_PASSWORD"
AUTH_FILE_VARIABLE = "CBIR_MILVUS_AUTH_FILE"
RETRY_VARIABLE = "CBIR_MILVUS_RETRY_SECONDS"
DEFAULT_RETRY_SECONDS = 60.0  # long enough for a Milvus standalone to restart (its health check answers in ~20-40 s)
CALL_TIMEOUT = 120.0  # seconds one request may take (a 16,384-row query of 512-d vectors on a busy server)
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")  # Milvus's collection names, with room for our suffixes
_CREDENTIALS_HELP = (f"set {TOKEN_VARIABLE}, or {USER_VARIABLE} and {PASSWORD_VARIABLE}, or name a JSON file with "
                     f"{AUTH_FILE_VARIABLE}")


@dataclass(frozen=True)
class MilvusLocation:
    """A Milvus-backed index's address: what pymilvus connects to, the collection, and (milvus-lite) the file."""

    uri: str  # http(s)://HOST:PORT, or the .db path for milvus-lite
    collection: str
    local_path: str | None = None

    @property
    def display(self) -> str:
        """The location as the user writes it (no credentials ever): for messages, ``index.folder`` and saved searches."""
        if self.local_path is not None:
            suffix = "" if self.collection == DEFAULT_COLLECTION else f"?collection={self.collection}"
            return f"milvus://{self.local_path}{suffix}"
        parts = urllib.parse.urlsplit(self.uri)
        scheme = "milvus+https" if parts.scheme == "https" else "milvus"
        return f"{scheme}://{parts.netloc}/{self.collection}"


def _restored(text: str) -> str:
    """A location that went through ``pathlib.Path`` (the module's parameter node keeps its index field as one), which
    folds '//' into '/': 'milvus:/HOST:PORT/C' back to 'milvus://HOST:PORT/C', 'milvus:/PATH.db' to 'milvus:///PATH.db'."""
    for scheme in ("milvus+https:", "milvus:"):
        if text.startswith(scheme + "/") and not text.startswith(scheme + "//"):
            rest = text[len(scheme) + 1:]
            return f"{scheme}///{rest}" if rest.split("?")[0].endswith(".db") else f"{scheme}//{rest}"
    return text


def is_milvus_location(text: str | os.PathLike[str] | None) -> bool:
    """Whether a location names a Milvus-backed index: a milvus:// URI, or a ``.db`` path that is not an index folder."""
    if not text:
        return False
    text = _restored(str(text))
    if text.startswith(SCHEMES):
        return True
    return text.endswith(".db") and not os.path.isfile(os.path.join(text, "manifest.json"))


def parse_location(text: str) -> MilvusLocation:
    """The Milvus location a text names (ParameterError for a malformed one, or credentials inside it)."""
    text = _restored(str(text))
    if not text.startswith(SCHEMES):
        if not text.endswith(".db"):
            raise ParameterError(f"{text}: not a Milvus location (milvus://HOST:PORT/COLLECTION, or a milvus-lite .db file)")
        return MilvusLocation(os.path.abspath(text), DEFAULT_COLLECTION, os.path.abspath(text))
    parts = urllib.parse.urlsplit(text)
    if parts.username or parts.password or "@" in parts.netloc:
        raise ParameterError(f"{parts.scheme}://...@{parts.hostname}: credentials in the location are refused (they would be "
                             f"kept in shell history and saved searches); {_CREDENTIALS_HELP}")
    query = urllib.parse.parse_qs(parts.query)
    if not parts.netloc:  # milvus:///path/file.db: a milvus-lite file
        path = urllib.parse.unquote(parts.path)
        if not path.endswith(".db"):
            raise ParameterError(f"{text}: a milvus-lite location names a .db file (milvus:///PATH/NAME.db)")
        collection = (query.get("collection") or [DEFAULT_COLLECTION])[0]
        _check_name(collection, text)
        return MilvusLocation(os.path.abspath(path), collection, os.path.abspath(path))
    collection = parts.path.strip("/")
    _check_name(collection, text)
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ParameterError(f"{text}: the port is not a number") from None
    scheme = "https" if parts.scheme == "milvus+https" else "http"
    return MilvusLocation(f"{scheme}://{parts.hostname}:{port}", collection)


def _check_name(collection: str, text: str) -> None:
    if not _NAME.match(collection or ""):
        raise ParameterError(f"{text}: the collection name must be letters, digits and underscores, starting with a letter "
                             f"(milvus://HOST:PORT/COLLECTION); got '{collection}'")


def _credential(value: object, where: str, key: str) -> str:
    """A credential as text; a value of another JSON type is refused without being shown."""
    if not isinstance(value, (str, int)) or isinstance(value, bool):
        raise InputError(where, f'"{key}" must be a string')
    return str(value)


def credentials() -> dict[str, str]:
    """{'token': ...} or {'user': ..., 'password': ...} from the auth file or the environment; {} for none."""
    path = os.environ.get(AUTH_FILE_VARIABLE)
    if path:
        return read_auth_file(path, _credential)
    if os.environ.get(TOKEN_VARIABLE):
        return {"token": os.environ[TOKEN_VARIABLE]}
    if os.environ.get(USER_VARIABLE):
        return {"user": os.environ[USER_VARIABLE], "password": os.environ.get(PASSWORD_VARIABLE, "")}
    return {}


def retry_seconds() -> float:
    """How long a call waits for a server that does not answer (CBIR_MILVUS_RETRY_SECONDS, default 60)."""
    try:
        return max(0.0, float(os.environ.get(RETRY_VARIABLE, DEFAULT_RETRY_SECONDS)))
    except ValueError:
        raise ParameterError(f"{RETRY_VARIABLE} must be a number of seconds, not '{os.environ[RETRY_VARIABLE]}'") from None


def _quiet_clients() -> None:
    """gRPC's C core and pymilvus log every failed attempt (pymilvus with a traceback): our one line says it instead."""
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
    import pymilvus  # noqa: F401  (its import configures its loggers; quieted after it)

    # grpc._server: milvus-lite's in-process server logs a traceback for each RPC it lacks (pymilvus's query iterator asks
    # for a timestamp first, then does without); milvus_lite: its own start and stop messages.
    for name in ("pymilvus", "pymilvus.milvus_client", "pymilvus.decorators", "pymilvus.client", "grpc._server", "milvus_lite"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)


def _kind_of(error: BaseException) -> str:
    """'transient' (no answer: ask again), 'released' (the server restarted and forgot what was loaded), 'auth', or 'other'."""
    text = str(error)
    code = getattr(error, "code", None)
    lowered = text.lower()
    if "released" in lowered or "not loaded" in lowered or "call load()" in lowered:
        return "released"
    if any(word in lowered for word in ("unauthenticated", "authenticat", "permission_denied", "permission denied",
                                        "invalid token", "wrong password", "unauthorized")):
        return "auth"
    if code == 2 or any(word in lowered for word in ("unavailable", "fail connecting", "connection refused", "deadline",
                                                     "failed to connect", "socket closed", "broken pipe", "connection reset",
                                                     "server unavailable", "goaway")):
        return "transient"
    return "other"


def _reason(error: BaseException) -> str:
    """The server's message, without pymilvus's wrapping."""
    text = str(error)
    found = re.search(r"message=(.*?)\)?>?$", text)
    return (found.group(1) if found else text).strip() or type(error).__name__


class MilvusConnection:
    """One pymilvus client for a location, made when first needed; calls ride out a restarting server."""

    def __init__(self, location: MilvusLocation, on_reload: Callable[[Any], None] | None = None):
        self.location = location
        self.on_reload = on_reload  # loads the index's collections again after the server forgot them (a restart)
        self._client: Any = None
        self._counted = False  # this connection counts among the clients of its milvus-lite file
        self.retry_seconds = retry_seconds()

    def client(self) -> Any:
        """The pymilvus client (connected on first use)."""
        if self._client is None:
            self._client = self._connect()
        return self._client

    def _connect(self) -> Any:
        _quiet_clients()
        from pymilvus import MilvusClient
        from pymilvus.exceptions import ConnectionConfigException

        given = credentials()
        path = self.location.local_path
        if path is not None and not os.path.isdir(os.path.dirname(path)):
            raise InputError(path, "its folder does not exist")
        try:
            client = MilvusClient(uri=self.location.uri, timeout=CALL_TIMEOUT, **given)
            if path is not None and not self._counted:
                _open_files[path] = _open_files.get(path, 0) + 1
                self._counted = True
            return client
        except ConnectionConfigException as error:
            if path is not None:
                raise InputError(path, "cannot be opened by milvus-lite: it is open in another process (a milvus-lite file "
                                       "serves one process at a time; for several readers and a writer, serve it with "
                                       f"'milvus-lite server --data-dir {path} --port {DEFAULT_PORT}' and use "
                                       f"milvus://127.0.0.1:{DEFAULT_PORT}/{self.location.collection}), or it is not a "
                                       f"milvus-lite database ({_reason(error)})") from None
            raise self._failure("connecting", error, 0.0) from None

    def call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """``client.method(*args, **kwargs)``, asked again while the server does not answer (up to the retry time); our
        one-line error after that, or at once for refused credentials and requests the server refuses."""
        return self.retrying(what, lambda client: getattr(client, method)(*args, **kwargs))

    def retrying(self, what: str, work: Callable[[Any], T]) -> T:
        """``work(client)``, done again from the start while the server does not answer (see :meth:`call`)."""
        began = time.monotonic()
        pause = 0.25
        reloaded = False
        while True:
            try:
                return work(self.client())
            except (InputError, StoreUnavailableError):
                raise
            except Exception as error:  # pymilvus raises its own and gRPC's exceptions
                kind = _kind_of(error)
                waited = time.monotonic() - began
                if kind == "released" and not reloaded and self.on_reload is not None:
                    reloaded = True
                    self.on_reload(self)
                    continue
                if kind != "transient" or waited >= self.retry_seconds:
                    raise self._failure(what, error, waited) from None
                time.sleep(min(pause, max(0.0, self.retry_seconds - waited)))
                pause = min(pause * 2, 5.0)
                if kind == "transient" and self._client is not None and waited > 2:
                    self._reset()  # a fresh channel, should the old one be stuck on a dead address

    def _reset(self) -> None:
        client, self._client = self._client, None
        try:
            client.close()
        except Exception:  # closing a client to a dead server may itself fail; nothing to keep
            pass

    def _failure(self, what: str, error: BaseException, waited: float) -> StoreUnavailableError:
        where = self.location.display
        kind = _kind_of(error)
        if kind == "auth":
            return StoreUnavailableError(f"{where}: the Milvus server refused the credentials while {what}; {_CREDENTIALS_HELP}")
        if kind == "transient":
            after = f" after {waited:.0f} s of retrying" if waited >= 1 else ""
            return StoreUnavailableError(f"{where}: the Milvus server does not answer ({_reason(error)}){after}; start it or "
                                         "check the address; a build run again resumes where it stopped")
        return StoreUnavailableError(f"{where}: the Milvus server refused {what}: {_reason(error)}")

    def close(self) -> None:
        """Close the client; a milvus-lite file is released for other processes when its last client in this one closes."""
        if self._client is not None:
            self._reset()
        path = self.location.local_path
        if path is None or not self._counted:
            return
        self._counted = False
        _open_files[path] = _open_files.get(path, 1) - 1
        if _open_files[path] <= 0:
            del _open_files[path]
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(path)


_open_files: dict[str, int] = {}  # milvus-lite files this process has clients of: its in-process server stops with the last
