"""The second hostile corpus (issue 27), the DICOM-source part: DICOMweb servers that answer what no PACS should (JSON of
other shapes, listings that page or stream forever, instances that never end, escape sequences, echoed credentials,
reports among the images), auth files and Slicer DICOM databases that hold what they should not.

Every case runs the real command line (``cbir index add``) against a small index that already holds one case, and must
end in one of two ways: refused, in one line that names the source and the problem; or done, with what the source really
holds. Either way: no traceback, no raw control character on the terminal, no credential in any output, nothing left in
the temporary folder, and the index still holds its case and verifies. The first corpus (issue 13) is
``test_index_fuzz.py``'s.
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from dicom_helpers import uid, write_ctk_database, write_series

from CBIRSlicerLib import cli
from CBIRSlicerLib.errors import SourceError
from CBIRSlicerLib.imaging import synthetic
from CBIRSlicerLib.index import dicomweb, dicomweb_listing
from CBIRSlicerLib.index.dicom_sources import local_series
from CBIRSlicerLib.index.dicomweb_auth import TOKEN_VARIABLE
from CBIRSlicerLib.index.dicomweb_bounds import Limits
from CBIRSlicerLib.index.first_build import holds_a_case, undone_if_empty
from CBIRSlicerLib.index.folder import Index
from CBIRSlicerLib.index.items import IndexSettings
from CBIRSlicerLib.models.registry import create_embedder

SECRET = "s3cret-token-4f9c"  # the bearer token every case runs with: it must never be printed
SETTINGS = IndexSettings(axes=["axial"], stride_mm=8.0, tile_sizes_mm=[], blobs_per_slice=0)
TIMEOUT = 4.0  # --timeout: seconds of silence a request may keep (ample for a loaded machine's quick answers)
# Small limits, so the cases that hit them take seconds: 1 MiB a listing page or an instance, 0.75 x --timeout (3 s) for one.
LIMITS = Limits(listing_bytes=2**20, instance_bytes=2**20, timeout_factor=0.75)
MAX_PAGES = 5
BOUNDARY = "cbir-hostile-boundary"


# ----- a DICOMweb server that answers what each case tells it to ---------------------------------------------------------
@dataclass
class Answer:
    """What the server sends: a status (and reason phrase), then a body of chunks (a generator may never end)."""

    status: int = 200
    reason: str | None = None
    content_type: str = "application/dicom+json"
    chunks: Callable[[], object] = lambda: iter([b"[]"])
    length: bool = True  # send Content-Length (a body that never ends has none)
    headers: dict = field(default_factory=dict)


def json_answer(value) -> Answer:
    body = value if isinstance(value, bytes) else json.dumps(value).encode()
    return Answer(chunks=lambda: iter([body]))


def multipart_answer(parts: list[bytes], endless: bytes | None = None, trickle: float = 0.0) -> Answer:
    """A WADO-RS answer: the parts, then (``endless``) one more part whose bytes never stop, every ``trickle`` seconds."""
    head = f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()

    def chunks():
        for part in parts:
            yield head + part + b"\r\n"
        if endless is None:
            yield f"--{BOUNDARY}--\r\n".encode()
            return
        yield head
        while True:
            yield endless
            if trickle:
                time.sleep(trickle)

    return Answer(content_type=f'multipart/related; type="application/dicom"; boundary={BOUNDARY}', chunks=chunks,
                  length=endless is None)


def endless_json(filler: bytes, trickle: float = 0.0) -> Answer:
    def chunks():
        yield b"["
        while True:
            yield filler
            if trickle:
                time.sleep(trickle)

    return Answer(chunks=chunks, length=False)


def series_json(study: str, series: str, description: str = "hostile", instances: int | None = 1) -> dict:
    found = {"0020000D": {"vr": "UI", "Value": [study]}, "0020000E": {"vr": "UI", "Value": [series]},
             "00080060": {"vr": "CS", "Value": ["CT"]}, "0008103E": {"vr": "LO", "Value": [description]}}
    if instances is not None:
        found["00201209"] = {"vr": "IS", "Value": [instances]}
    return found


class HostileServer:
    """Answers QIDO-RS listings with ``listing(offset, headers)`` and WADO-RS series with ``instances(series_uid)``."""

    def __init__(self, listing: Callable[[int, dict], Answer], instances: Callable[[str], Answer] | None = None):
        self.listing, self.instances = listing, instances or (lambda series: Answer(status=404, chunks=lambda: iter([b""])))
        self.requests: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append(self.path)
                parts = urllib.parse.urlsplit(self.path)
                query = dict(urllib.parse.parse_qsl(parts.query))
                segments = parts.path.strip("/").split("/")
                if "studies" in segments and segments[-2:-1] == ["series"]:
                    answer = server.instances(segments[-1])
                else:
                    answer = server.listing(int(query.get("offset", 0)), dict(self.headers))
                try:
                    body = b"".join(answer.chunks()) if answer.length else None
                    self.send_response(answer.status, answer.reason)
                    self.send_header("Content-Type", answer.content_type)
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    if body is not None:
                        self.send_header("Content-Length", str(len(body)))
                    else:
                        self.send_header("Connection", "close")
                        self.close_connection = True
                    self.end_headers()
                    for chunk in [body] if body is not None else answer.chunks():
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except OSError:
                    self.close_connection = True  # the client hung up on a body that would never end: the point

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def source(self) -> str:
        return f"dicomweb:http://127.0.0.1:{self.server.server_address[1]}/dicom-web"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ----- the cases -------------------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One hostile input: how to make the source (from the shared material), what the output must say, how many series end
    up added (0: refused), and extra command-line arguments."""

    name: str
    source: Callable[[dict], object]  # material -> HostileServer, or a source string (a database)
    says: list[str]
    added: int = 0
    args: list[str] = field(default_factory=list)
    auth: str | None = None  # an auth file's text, given with --auth-file
    alone: bool = False  # run in a process of its own, where the libraries' warnings and logs reach the terminal as they would


def _study_series(n: int = 0) -> tuple[str, str]:
    return uid("hostile-study", n), uid("hostile-series", n)


def _listing_of(*entries: dict) -> Callable[[int, dict], Answer]:
    return lambda offset, headers: json_answer(list(entries) if offset == 0 else [])


def _server(listing, instances=None):
    return lambda material: HostileServer(listing, instances)


def _good_series(material, which: str = "series", description: str = "hostile", extra: list[bytes] = ()) -> HostileServer:
    """A server listing one real series (6 slices) and sending it, with ``extra`` parts after its instances; like many
    servers, it ignores 'offset' and sends the same page every time."""
    parts, (study, series) = material[which]
    listed = series_json(study, series, description, len(parts) + len(extra))
    return HostileServer(lambda offset, headers: json_answer([listed]),
                         lambda asked: multipart_answer([*parts, *extra]) if asked == series else Answer(status=404))


def _first_page_always(offset, headers):
    """A server that ignores 'offset' and answers every listing with the most series a page asks for (the first ones)."""
    return json_answer([series_json(*_study_series(k)) for k in range(dicomweb_listing.LISTING_PAGE)])


def _pages_forever(offset, headers):
    return json_answer([series_json(*_study_series(offset + k)) for k in range(2)])


def _warning_header(material) -> HostileServer:
    """The real series, listed with a Warning header (QIDO-RS's 'more results') that carries escape sequences and the
    token it was sent."""
    server = _good_series(material)
    listing = server.listing

    def warned(offset, headers):
        answer = listing(offset, headers)
        answer.headers["Warning"] = f"299 pacs \"\x1b[2J\x1b]0;owned\x07{headers.get('Authorization', '')}\""
        return answer

    server.listing = warned
    return server


def _bare_instance(material) -> HostileServer:
    """A one-instance series sent as a bare application/dicom body instead of a multipart answer: read all the same (one
    slice: refused as 2D, by the reader, in one line that names the series, not the deleted download), without the
    client's two-line warning."""
    parts, (study, series) = material["series"]
    return HostileServer(_listing_of(series_json(study, series, "bare", 1)),
                         lambda asked: Answer(content_type="application/dicom", chunks=lambda: iter([parts[0]])))


def _echo_authorization(offset, headers):
    return Answer(status=500, reason=f"Bad {headers.get('Authorization', '')}", chunks=lambda: iter([b""]))


CASES = [
    # Listings of other shapes: refused, in one line.
    Case("listing-is-a-string", _server(lambda o, h: json_answer("hello")), ["listing series failed", "is a string, not an array"]),
    Case("listing-is-a-number", _server(lambda o, h: json_answer(42)), ["listing series failed", "the answer is a number, not an array"]),
    Case("listing-of-strings", _server(lambda o, h: json_answer(["a", "b"])), ["a listed series is a string, not an object"]),
    Case("attribute-is-a-list", _server(lambda o, h: json_answer([{"0020000E": [1, 2]}])), ["0020000E is an array, not an object"]),
    Case("value-is-not-a-list", _server(lambda o, h: json_answer([{"0020000D": {"vr": "UI", "Value": "1.2"}}])),
         ['"Value" that is a string, not an array']),
    Case("value-is-a-list-of-lists", _server(lambda o, h: json_answer([{"0020000E": {"vr": "UI", "Value": [[1]]}}])),
         ["attribute 0020000E has a value that is an array"]),
    Case("uid-climbs-out-of-the-download-folder",
         _server(_listing_of(series_json("1.2.3", "../../../../tmp/cbir-evil"))), ["is not a DICOM UID"]),
    Case("instance-count-of-5000-digits", lambda m: HostileServer(
        lambda o, h: json_answer([{**series_json(*m["series"][1], instances=None), "00201209": {"vr": "IS", "Value": ["9" * 5000]}}]),
        lambda s: multipart_answer(m["series"][0])), ["1 case(s) added"], added=1),
    Case("listing-is-not-json", _server(lambda o, h: json_answer(b"<html>maintenance</html>")),
         ["listing series failed", "the answer could not be read"]),
    Case("listing-nested-100000-deep", _server(lambda o, h: json_answer(b"[" * 100_000 + b"]" * 100_000)),
         ["listing series failed", "JSON nested too deep"]),
    # Listings without end: pages, bytes, time.
    # A server that ignores 'offset' sends its first page again: with one series that is the whole listing, or a server that
    # caps its answers at one series (the note says so); with a full page, the series after it cannot be listed.
    Case("ignores-offset", lambda m: _good_series(m), ["1 case(s) added", "warning dicomweb:",
                                                       "the server ignores 'offset'", "caps its answers at 1 series"], added=1),
    Case("ignores-offset-with-full-pages", _server(_first_page_always),
         ["listing series failed: the server ignores 'offset'", "the same 1000 again", "the series after them cannot be listed"]),
    Case("pages-forever", _server(_pages_forever), [f"kept paging past {MAX_PAGES} pages"]),
    Case("listing-body-never-ends", _server(lambda o, h: endless_json(b" " * 65536)), ["listing page of more than 1 MiB; cut off"]),
    Case("listing-body-trickles-forever", _server(lambda o, h: endless_json(b" ", trickle=0.05)),
         [f"kept sending a listing page for more than {LIMITS.timeout_factor * TIMEOUT:g} s; cut off"]),
    # Instances without end.
    Case("instance-never-ends", _server(_listing_of(series_json(*_study_series(), instances=1)),
                                        lambda s: multipart_answer([], endless=b"\0" * 65536)),
         ["fetch failed after 0 instance(s)", "an instance of more than 1 MiB; cut off"]),
    Case("instance-trickles-forever", _server(_listing_of(series_json(*_study_series(), instances=1)),
                                              lambda s: multipart_answer([], endless=b"\0", trickle=0.05)),
         ["fetch failed", f"kept sending an instance for more than {LIMITS.timeout_factor * TIMEOUT:g} s; cut off"]),
    # What reaches the terminal.
    Case("escape-sequences-in-a-reason-phrase",
         _server(lambda o, h: Answer(status=500, reason="\x1b]0;owned\x07\x1b[2JOops", chunks=lambda: iter([b""]))),
         ["HTTP 500 \\x1b]0;owned\\x07\\x1b[2JOops"]),
    Case("escape-sequences-in-a-series-description",
         lambda m: _good_series(m, "escaped", description="\x1b[2J\x1b[31mCT\x1b[0m"), ["1 case(s) added"], added=1),
    Case("server-echoes-the-token-in-its-reason-phrase", _server(_echo_authorization), ["HTTP 500 Bad Bearer ***"]),
    Case("warning-header-with-escapes-and-the-token", _warning_header, ["\\x1b[2J\\x1b]0;owned\\x07Bearer ***", "1 case(s) added"],
         added=1, alone=True),
    Case("a-bare-instance-instead-of-a-multipart-answer", _bare_instance, ["(bare): is a 2D image (32x32), not a volume"], alone=True),
    # Credentials that would break a header, or files that are not credentials.
    Case("token-with-a-header-injection", lambda m: _good_series(m), ["auth.json", '"token" holds a line break'],
         auth=json.dumps({"token": SECRET + "\r\nX-Injected: 1"})),
    Case("token-is-an-object", lambda m: _good_series(m), ["auth.json", '"token" must be a string'],
         auth=json.dumps({"token": {"value": SECRET}})),
    Case("auth-file-nested-100000-deep", lambda m: _good_series(m), ["auth.json", "is not JSON"], auth="[" * 100_000),
    # What is fetched: reports among the images are never written; a series of reports only is refused.
    Case("a-report-among-the-images", lambda m: _good_series(m, extra=[m["report"]]), ["1 case(s) added"], added=1),
    Case("a-series-of-reports-only", lambda m: HostileServer(_listing_of(series_json(*_study_series(), instances=1)),
                                                             lambda s: multipart_answer([m["report"]])),
         ["none of its 1 instance(s) is an image"]),
    Case("an-instance-of-another-series", lambda m: HostileServer(
        _listing_of(series_json(*_study_series(7), instances=len(m["series"][0]))), lambda s: multipart_answer(m["series"][0])),
        ["the server sent an instance of another series"]),
    # Slicer's DICOM database, hand-edited.
    Case("database-filename-is-a-number", lambda m: m["database-number"], ["1 of its 6 files are missing"]),
    Case("database-description-with-escapes", lambda m: m["database-escapes"], ["1 case(s) added"], added=1),
]


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """A small index holding one case (from a NIfTI file), a real 4-slice series as WADO-RS parts, a text report of the
    same series naming its patient, and two hand-edited Slicer DICOM databases."""
    import pydicom

    root = tmp_path_factory.mktemp("hostile")
    case = synthetic.make_case("kept", 3, ("cyst",), shape=(32, 32, 6), spacing=(4.0, 4.0, 8.0))
    path = synthetic.write_volume(case.volume, str(root / "kept.nii.gz"))
    embedder = create_embedder("handcrafted")
    index = str(root / "index")
    with Index.create(index, embedder, SETTINGS) as built:
        assert len(built.add_sources([path], embedder).added) == 1
    study, series = _study_series()
    info = write_series(case.volume, str(root / "series"), "hostile", study_uid=study, series_uid=series)
    parts = [open(f, "rb").read() for f in info.files]
    # The same voxels as another series whose files' own SeriesDescription (the case's name) carries escape sequences.
    escaped = write_series(case.volume, str(root / "escaped"), "\x1b[2J\x1b[31mCT\x1b[0m", study_uid=uid("escaped-study"),
                           series_uid=uid("escaped-series"))
    report = pydicom.dcmread(info.files[0])
    del report.PixelData
    report.SOPClassUID = report.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    report.PatientName, report.Modality = "Doe^Jane", "SR"
    written = io.BytesIO()
    report.save_as(written, enforce_file_format=True)
    # Databases: one whose Images.Filename is a number, one whose series description carries escape sequences.
    import sqlite3

    os.makedirs(root / "number")
    number = write_ctk_database(str(root / "number" / "ctkDICOM.sql"), [info])

    with sqlite3.connect(number) as db:
        db.execute("UPDATE Images SET Filename = 5 WHERE rowid = (SELECT min(rowid) FROM Images)")
    escapes = write_ctk_database(str(root / "ctkDICOM.sql"), [info])
    with sqlite3.connect(escapes) as db:
        db.execute("UPDATE Series SET SeriesDescription = ?", ("\x1b[31mRED\x1b]0;title\x07",))
    return {"index": index, "nifti": path, "series": (parts, (study, series)), "report": written.getvalue(),
            "escaped": ([open(f, "rb").read() for f in escaped.files], (escaped.study_uid, escaped.series_uid)),
            "database-number": number, "database-escapes": escapes}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_source_is_one_line_and_changes_nothing(case, material, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(dicomweb, "LIMITS", LIMITS)
    monkeypatch.setattr(dicomweb_listing, "MAX_LISTING_PAGES", MAX_PAGES)
    monkeypatch.setenv(TOKEN_VARIABLE, SECRET)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    index = str(tmp_path / "index")
    shutil.copytree(material["index"], index)
    made = case.source(material)
    source = made.source if isinstance(made, HostileServer) else made
    args = ["index", "add", source, "--index", index, "--timeout", str(TIMEOUT), *case.args]
    if case.auth is not None:
        (tmp_path / "auth.json").write_text(case.auth)
        args += ["--auth-file", str(tmp_path / "auth.json")]
    try:
        if case.alone:
            done = subprocess.run([sys.executable, "-m", "CBIRSlicerLib.cli", *args], capture_output=True, text=True, timeout=300,
                                  env={**os.environ, TOKEN_VARIABLE: SECRET, "TMPDIR": str(tmp_path / "tmp")})
            code, out, err = done.returncode, done.stdout, done.stderr
        else:
            code = cli.main(args)
            out, err = capsys.readouterr()
    finally:
        if isinstance(made, HostileServer):
            made.close()
    printed = out + err
    assert "Traceback" not in printed and "\x1b" not in printed and "\x07" not in printed, printed
    assert str(tmp_path / "tmp") not in printed, printed  # a download's path is gone when the message is read: never named
    assert "Warning:" not in printed and "warn(" not in printed, printed  # no library's two-line warning
    for secret in (SECRET, base64.b64encode(SECRET.encode()).decode()):
        assert secret not in printed
    for words in case.says:
        assert words in printed, printed
    if case.added:
        assert code == 0 and f"{case.added} case(s) added" in out, printed
    else:
        assert code == 1, printed
        line = err.strip().splitlines()[-1]  # after progress lines, if a listing came
        assert line.startswith("cbir: error: ") and err.count("cbir: error:") == 1, err
        refused_early = case.auth is not None
        named = "auth.json" if refused_early else source.removeprefix("ctkdb:") if source.startswith("ctkdb:") else source
        assert named in line or named in out, printed
    assert os.listdir(tmp_path / "tmp") == []  # no download (nor a report naming its patient) left behind
    kept = Index.open(index)
    try:
        assert kept.catalog.count("cases") == 1 + case.added and kept.verify() == []
        assert all(c.name.isprintable() for c in kept.catalog.cases())  # a name from a hostile header is shown escaped
    finally:
        kept.catalog.close()


def test_a_uid_from_a_saved_search_never_names_a_folder_outside_the_cache(tmp_path):
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    with pytest.raises(SourceError, match="is not a DICOM UID"):
        local_series("dicomweb:http://127.0.0.1:9/dicom-web", "../precious", cache=str(tmp_path / "cache"))
    assert (outside / "keep.txt").read_text() == "mine" and not (tmp_path / "cache").exists()


def test_a_slow_listing_is_cut_off_by_time_not_by_silence(monkeypatch):
    """The watchdog's promise on its own: a body that keeps trickling (so --timeout never fires) ends at the limit."""
    monkeypatch.setattr(dicomweb, "LIMITS", Limits(timeout_factor=1.0))
    server = HostileServer(lambda o, h: endless_json(b" ", trickle=0.02))
    try:
        with pytest.raises(SourceError, match="for more than 1 s; cut off"):
            dicomweb.DicomWebServer(server.source, timeout=1.0).series()
        # Cut off once, not twice: the client's quick retry of a request that was cut off fails at once.
        assert len(server.requests) == 1, server.requests
    finally:
        server.close()


def test_a_first_build_that_fails_leaves_nothing_behind(material, tmp_path, capsys, monkeypatch):
    """Refused at listing, or every series skipped: no index folder (nor index files beside a user's own) is left."""
    monkeypatch.setenv(TOKEN_VARIABLE, SECRET)
    slicing = ["--model", "handcrafted", "--stride-mm", "8", "--tiles-mm", "", "--blobs", "0", "--timeout", str(TIMEOUT)]
    refusing = HostileServer(lambda o, h: Answer(status=401, chunks=lambda: iter([b""])))
    skipping = HostileServer(_listing_of(series_json(*_study_series(), instances=1)), lambda s: multipart_answer([material["report"]]))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    try:
        assert cli.main(["index", "build", refusing.source, "--index", str(tmp_path / "new"), *slicing]) == 1
        assert "HTTP 401" in capsys.readouterr().err and not (tmp_path / "new").exists()
        assert cli.main(["index", "build", skipping.source, "--index", str(mine), *slicing]) == 1
        err = capsys.readouterr().err
        assert "nothing indexed (every file was skipped); no index was made" in err, err
        assert sorted(os.listdir(mine)) == ["notes.txt"] and (mine / "notes.txt").read_text() == "mine"
    finally:
        refusing.close()
        skipping.close()
    # A first build that indexed a case and then stopped (Ctrl-C) keeps its index: the next build resumes it.
    embedder = create_embedder("handcrafted")
    with pytest.raises(KeyboardInterrupt), undone_if_empty(str(tmp_path / "stopped")):
        with Index.create(str(tmp_path / "stopped"), embedder, SETTINGS) as index:
            assert len(index.add_sources([material["nifti"]], embedder).added) == 1
        raise KeyboardInterrupt
    assert holds_a_case(str(tmp_path / "stopped"))


def test_a_fetched_series_problem_names_the_instance_never_the_download(tmp_path):
    """The download is gone when the message is read: a file of it is named as the series' instance it was."""
    from CBIRSlicerLib.errors import DicomSeriesError, UnreadableFileError
    from CBIRSlicerLib.imaging.readers import CaseSource
    from CBIRSlicerLib.index.writer import _fetched_problem

    files = tuple(str(tmp_path / f"{n:05d}.dcm") for n in range(3))
    source = CaseSource(str(tmp_path), uid("fetched"), files)
    assert _fetched_problem(UnreadableFileError(files[1], "truncated"), source) == "instance 2 of 3: truncated"
    assert _fetched_problem(DicomSeriesError(str(tmp_path), "2 slices missing"), source) == "2 slices missing"
    single = CaseSource(str(tmp_path), uid("fetched"), files[:1])
    assert _fetched_problem(UnreadableFileError(files[0], "is a 2D image"), single) == "is a 2D image"
    said = _fetched_problem(OSError(f"[Errno 5] Input/output error: '{files[2]}'"), source)
    assert str(tmp_path) not in said and said.endswith("'00002.dcm'")
