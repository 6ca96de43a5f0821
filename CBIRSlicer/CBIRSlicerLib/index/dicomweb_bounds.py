"""A DICOMweb server's answers, bounded: each listing page and each fetched instance has a size and a time limit.

A body that never ends, or trickles a byte at a time so that ``--timeout`` (which counts only silence) never fires, is
cut off at its limit (:class:`Limits`), so it cannot hang a build; a multipart answer's every part has the limit anew.
"""

from __future__ import annotations

import os
import re
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # requests loads with the first server spoken to
    import requests


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


@dataclass
class SessionState:
    """What a bounded session's next answers are (listing pages or instances), and the limit one tripped, if any."""

    instance: bool = False
    tripped: str | None = None


class BodyLimitError(OSError):
    """A server kept sending past a listing page's or an instance's limit (bytes or time) and was cut off."""


class _Watch:
    """Cuts a response off when its body (or, for a multipart answer, its current part) runs past the time allowed: the
    socket is shut down from a timer, which ends a read that a trickling server would otherwise keep alive forever."""

    def __init__(self, response: requests.Response, seconds: float):
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


def _bounded(response: requests.Response, what: str, max_bytes: int, seconds: float, on_trip: Callable[[str], None]) -> None:
    """Make ``response.iter_content`` (through which requests reads every body, ``.content`` included) stop with
    BodyLimitError past ``max_bytes`` or ``seconds``: for the whole body, or for each part of a multipart answer."""
    content_type = response.headers.get("Content-Type", "")
    boundary = re.search(r'(?i)boundary="?([^";]+)"?', content_type) if "multipart" in content_type.lower() else None
    marker = b"--" + boundary.group(1).encode("latin-1", "replace") if boundary else None
    original = response.iter_content

    def trip(text: str) -> BodyLimitError:
        on_trip(text)
        return BodyLimitError(text)

    def iter_content(chunk_size: int | None = 1, decode_unicode: bool = False) -> Iterator[Any]:
        watch = _Watch(response, seconds)
        size, tail = 0, b""
        too_slow = f"the server kept sending {what} for more than {seconds:g} s; cut off"
        watch.restart()
        try:
            for chunk in original(chunk_size, decode_unicode=True) if decode_unicode else original(chunk_size):
                if watch.expired:
                    raise trip(too_slow)
                size += len(chunk)
                if marker is not None and isinstance(chunk, bytes):  # a new part begins: it has the whole limit again
                    # (text chunks, decode_unicode: only a caller reading text; a multipart answer is read as bytes)
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

    # requests reads every body through this method; the instance's own attribute stands in for the class's
    response.iter_content = iter_content  # type: ignore[method-assign]


def bounded_session(limits: Limits, timeout: float, state: SessionState) -> requests.Session:
    """A requests session whose every answer is bounded (:func:`_bounded`), as ``state`` says what they are; once one was
    cut off, the client's quick retry of the same request fails at once instead of waiting out the limit again."""
    import requests

    def tripped(text: str) -> None:
        state.tripped = text

    class BoundedSession(requests.Session):
        def request(self, method: str, url: Any, *args: Any, **kwargs: Any) -> requests.Response:
            if state.tripped:
                raise BodyLimitError(state.tripped)
            stream = kwargs.pop("stream", False)
            response = super().request(method, url, *args, **{**kwargs, "stream": True})
            what, max_bytes = ("an instance", limits.instance_bytes) if state.instance else ("a listing page", limits.listing_bytes)
            _bounded(response, what, max_bytes, limits.timeout_factor * timeout, tripped)
            if not stream:
                response.content  # noqa: B018 (read now, through the bounds, as requests would have)
            return response

    return BoundedSession()
