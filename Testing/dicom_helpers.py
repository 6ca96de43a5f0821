"""Test helpers: real DICOM series from volumes (pydicom, integer storage with rescale), a CTK-schema DICOM database
over them, and a real Orthanc server with its DICOMweb plugin started on a free port of 127.0.0.1."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

import numpy as np

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
UID_ROOT = "1.2.826.0.1.3680043.10.1137"  # a private test root; every UID below it is made from names, so reruns agree


def uid(*parts: object) -> str:
    """A deterministic DICOM UID (digits and dots, at most 64 characters) for a name."""
    import hashlib

    digits = str(int(hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest(), 16))[:30]
    return f"{UID_ROOT}.{digits.lstrip('0') or '1'}"


@dataclass
class SeriesInfo:
    """What a test wrote: one series, its UIDs, descriptive tags and files."""

    name: str
    patient_id: str
    study_uid: str
    series_uid: str
    modality: str
    study_date: str
    manufacturer: str
    body_part: str | None
    files: list[str] = field(default_factory=list)


# Transfer syntaxes a PACS may store a series in, and who encodes them here: pydicom's own encoders (RLE, deflate), CharLS
# through pyjpegls (a test dependency), and GDCM through SimpleITK for JPEG 2000 (pydicom would need pylibjpeg-openjpeg).
EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG2000_LOSSLESS = "1.2.840.10008.1.2.4.90"
JPEGLS_LOSSLESS = "1.2.840.10008.1.2.4.80"
RLE_LOSSLESS = "1.2.840.10008.1.2.5"
DEFLATED = "1.2.840.10008.1.2.1.99"


def _encode(ds, transfer_syntax: str) -> None:
    """Store the dataset's pixels in the transfer syntax (lossless: the voxels read back are the ones written)."""
    from pydicom.uid import UID

    if transfer_syntax == EXPLICIT_LE:
        return
    if transfer_syntax == DEFLATED:  # the whole dataset is deflated when written; the pixels stay native
        ds.file_meta.TransferSyntaxUID = UID(DEFLATED)
    elif transfer_syntax in (RLE_LOSSLESS, JPEGLS_LOSSLESS):
        ds.compress(UID(transfer_syntax))
    elif transfer_syntax == JPEG2000_LOSSLESS:
        import tempfile

        import pydicom
        import SimpleITK as sitk

        stored = np.frombuffer(ds.PixelData, dtype="<u2").reshape(ds.Rows, ds.Columns)
        with tempfile.TemporaryDirectory() as scratch:
            path = os.path.join(scratch, "frame.dcm")
            writer = sitk.ImageFileWriter()
            writer.SetFileName(path)
            writer.SetUseCompression(True)
            writer.SetCompressor("JPEG2000")  # GDCM writes JPEG 2000 lossless
            writer.Execute(sitk.GetImageFromArray(stored[np.newaxis]))
            encoded = pydicom.dcmread(path)
        if encoded.file_meta.TransferSyntaxUID != JPEG2000_LOSSLESS:
            raise RuntimeError(f"GDCM wrote {encoded.file_meta.TransferSyntaxUID}, not JPEG 2000 lossless")
        ds.PixelData = encoded.PixelData  # encapsulated: an offset table, then the frame's codestream
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = UID(JPEG2000_LOSSLESS)
    else:
        raise ValueError(f"no encoder here for transfer syntax {transfer_syntax}")


def write_series(volume, folder: str, name: str, *, patient_id: str = "P1", study_date: str = "20240105", modality: str = "CT",
                 body_part: str | None = "ABDOMEN", manufacturer: str = "CBIR Test Scanner", study_uid: str | None = None,
                 series_uid: str | None = None, transfer_syntax: str = EXPLICIT_LE) -> SeriesInfo:
    """One DICOM file per k slice: unsigned 16-bit storage with RescaleIntercept (CT) and exact geometry tags, stored in
    the transfer syntax asked for."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian
    from pydicom.valuerep import format_number_as_ds

    os.makedirs(folder, exist_ok=True)
    study_uid = study_uid or uid("study", patient_id, name)
    series_uid = series_uid or uid("series", name)
    image = volume.to_sitk()
    direction = np.array(image.GetDirection()).reshape(3, 3)
    spacing = image.GetSpacing()
    values = np.asarray(volume.array)
    if not np.allclose(values, np.round(values)):
        raise ValueError(f"{name}: voxels must be integers to be stored as DICOM integers")
    intercept = int(min(-1024, np.floor(values.min()))) if modality == "CT" else int(min(0, np.floor(values.min())))
    stored = np.round(values - intercept)
    if stored.max() > 65535:
        raise ValueError(f"{name}: voxel range too wide for 16-bit storage")
    ds_number = lambda v: format_number_as_ds(float(v))  # DS is at most 16 characters
    info = SeriesInfo(name, patient_id, study_uid, series_uid, modality, study_date, manufacturer, body_part)
    for k in range(values.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = f"{series_uid}.{k + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE_STORAGE, meta.MediaStorageSOPInstanceUID
        ds.PatientID, ds.PatientName = patient_id, f"Test^{patient_id}"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.FrameOfReferenceUID = uid("frame", name)
        ds.StudyDate, ds.SeriesDate, ds.StudyTime = study_date, study_date, "120000"
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, k + 1
        ds.Modality, ds.Manufacturer, ds.SeriesDescription = modality, manufacturer, name
        ds.StudyDescription = f"study of {name}"
        if body_part:
            ds.BodyPartExamined = body_part
        ds.ImagePositionPatient = [ds_number(v) for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [ds_number(v) for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [ds_number(spacing[1]), ds_number(spacing[0])]  # row spacing (between rows: j), then column (i)
        ds.SliceThickness = ds_number(spacing[2])
        ds.Rows, ds.Columns = values.shape[1], values.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = str(intercept), "1", "HU"
        ds.PixelData = np.ascontiguousarray(stored[k], dtype="<u2").tobytes()
        _encode(ds, transfer_syntax)
        path = os.path.join(folder, f"{k + 1:04d}.dcm")
        ds.save_as(path, enforce_file_format=True)
        info.files.append(path)
    return info


def write_cohort_series(cases, folder: str, study_date: str = "20240105", body_part: str | None = None) -> list[SeriesInfo]:
    """Each synthetic case as its own patient, study and series (folder per case), named after the case.

    No Body Part Examined by default, as many scanners leave it: the index then infers it from the image, as it does for
    the same cases as NIfTI files, so both give the same answers."""
    return [write_series(case.volume, os.path.join(folder, case.name), case.name, patient_id=f"PAT-{case.name}",
                         study_date=study_date, body_part=body_part) for case in cases]


# ----- a CTK-schema DICOM database (what Slicer's DICOM module keeps as ctkDICOM.sql) -------------------------------------
CTK_SCHEMA = """
CREATE TABLE 'SchemaInfo' ( 'Version' VARCHAR(1024) NOT NULL );
INSERT INTO 'SchemaInfo' VALUES('0.7.0');
CREATE TABLE 'Images' ('SOPInstanceUID' VARCHAR(64) NOT NULL, 'Filename' VARCHAR(1024) NOT NULL,
  'SeriesInstanceUID' VARCHAR(64) NOT NULL, 'InsertTimestamp' VARCHAR(20) NOT NULL,
  'DisplayedFieldsUpdatedTimestamp' DATETIME NULL, PRIMARY KEY ('SOPInstanceUID'));
CREATE TABLE 'Patients' ('UID' INTEGER PRIMARY KEY AUTOINCREMENT, 'PatientsName' VARCHAR(255) NULL,
  'PatientID' VARCHAR(255) NULL, 'PatientsBirthDate' DATE NULL, 'PatientsBirthTime' TIME NULL, 'PatientsSex' VARCHAR(1) NULL,
  'PatientsAge' VARCHAR(10) NULL, 'PatientsComments' VARCHAR(255) NULL, 'InsertTimestamp' VARCHAR(20) NOT NULL,
  'DisplayedPatientsName' VARCHAR(255) NULL, 'DisplayedNumberOfStudies' INT NULL, 'DisplayedFieldsUpdatedTimestamp' DATETIME NULL);
CREATE TABLE 'Studies' ('StudyInstanceUID' VARCHAR(64) NOT NULL, 'PatientsUID' INT NOT NULL, 'StudyID' VARCHAR(255) NULL,
  'StudyDate' DATE NULL, 'StudyTime' VARCHAR(20) NULL, 'StudyDescription' VARCHAR(255) NULL, 'AccessionNumber' VARCHAR(255) NULL,
  'ModalitiesInStudy' VARCHAR(255) NULL, 'InstitutionName' VARCHAR(255) NULL, 'ReferringPhysician' VARCHAR(255) NULL,
  'PerformingPhysiciansName' VARCHAR(255) NULL, 'InsertTimestamp' VARCHAR(20) NOT NULL, 'DisplayedNumberOfSeries' INT NULL,
  'DisplayedFieldsUpdatedTimestamp' DATETIME NULL, PRIMARY KEY ('StudyInstanceUID'));
CREATE TABLE 'Series' ('SeriesInstanceUID' VARCHAR(64) NOT NULL, 'StudyInstanceUID' VARCHAR(64) NOT NULL, 'SeriesNumber' INT NULL,
  'SeriesDate' DATE NULL, 'SeriesTime' VARCHAR(20) NULL, 'SeriesDescription' VARCHAR(255) NULL, 'Modality' VARCHAR(20) NULL,
  'BodyPartExamined' VARCHAR(255) NULL, 'FrameOfReferenceUID' VARCHAR(64) NULL, 'AcquisitionNumber' INT NULL,
  'ContrastAgent' VARCHAR(255) NULL, 'ScanningSequence' VARCHAR(45) NULL, 'EchoNumber' INT NULL, 'TemporalPosition' INT NULL,
  'InsertTimestamp' VARCHAR(20) NOT NULL, 'DisplayedCount' INT NULL, 'DisplayedSize' VARCHAR(20) NULL,
  'DisplayedNumberOfFrames' INT NULL, 'DisplayedFieldsUpdatedTimestamp' DATETIME NULL, PRIMARY KEY ('SeriesInstanceUID'));
CREATE INDEX 'ImagesSeriesIndex' ON 'Images' ('SeriesInstanceUID');
CREATE INDEX 'SeriesStudyIndex' ON 'Series' ('StudyInstanceUID');
"""


def write_ctk_database(path: str, series: list[SeriesInfo], relative: bool = True) -> str:
    """A CTK-schema SQLite file listing the series' files (paths relative to the database's folder, as CTK stores
    files it copied into its own folder, unless ``relative`` is off)."""
    db = sqlite3.connect(path)
    db.executescript(CTK_SCHEMA)
    now = datetime.datetime(2024, 1, 6).isoformat()
    base = os.path.dirname(os.path.abspath(path))
    patients: dict[str, int] = {}
    for info in series:
        if info.patient_id not in patients:
            cursor = db.execute("INSERT INTO Patients (PatientsName, PatientID, InsertTimestamp) VALUES (?, ?, ?)",
                                (f"Test^{info.patient_id}", info.patient_id, now))
            patients[info.patient_id] = cursor.lastrowid
        db.execute("INSERT OR IGNORE INTO Studies (StudyInstanceUID, PatientsUID, StudyDate, StudyDescription, ModalitiesInStudy, "
                   "InsertTimestamp) VALUES (?, ?, ?, ?, ?, ?)", (info.study_uid, patients[info.patient_id],
                                                                  info.study_date, f"study of {info.name}", info.modality, now))
        db.execute("INSERT INTO Series (SeriesInstanceUID, StudyInstanceUID, SeriesNumber, SeriesDate, SeriesDescription, Modality, "
                   "BodyPartExamined, InsertTimestamp) VALUES (?, ?, 1, ?, ?, ?, ?, ?)",
                   (info.series_uid, info.study_uid, info.study_date, info.name, info.modality, info.body_part, now))
        for n, file in enumerate(info.files):
            name = os.path.relpath(file, base) if relative else os.path.abspath(file)
            db.execute("INSERT INTO Images (SOPInstanceUID, Filename, SeriesInstanceUID, InsertTimestamp) VALUES (?, ?, ?, ?)",
                       (f"{info.series_uid}.{n + 1}", name, info.series_uid, now))
    db.commit()
    db.close()
    return path


# ----- a real Orthanc with the DICOMweb plugin ----------------------------------------------------------------------------
ORTHANC = "Orthanc"
DICOMWEB_PLUGIN_PATHS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",)


def free_port() -> int:
    """A TCP port of 127.0.0.1 nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def dicomweb_plugin() -> str:
    """The DICOMweb plugin of the Debian package orthanc-dicomweb (asked of dpkg, else its usual place)."""
    try:
        listed = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=False).stdout.split()
    except OSError:
        listed = []
    for path in [p for p in listed if p.endswith(".so")] + list(DICOMWEB_PLUGIN_PATHS):
        if os.path.isfile(path):
            return path
    raise RuntimeError("the Orthanc DICOMweb plugin is not installed: apt-get install -y orthanc orthanc-dicomweb")


class OrthancServer:
    """An Orthanc process on 127.0.0.1 with its own storage folder; start, upload, delete, stop, start again."""

    def __init__(self, folder: str, users: dict[str, str] | None = None):
        if shutil.which(ORTHANC) is None:
            raise RuntimeError("Orthanc is not installed: apt-get install -y orthanc orthanc-dicomweb")
        self.folder = folder
        self.http_port, self.dicom_port = free_port(), free_port()
        self.users = users or {}
        self.process: subprocess.Popen | None = None
        os.makedirs(os.path.join(folder, "storage"), exist_ok=True)
        self.config = os.path.join(folder, "orthanc.json")
        with open(self.config, "w", encoding="utf-8") as handle:
            json.dump({"Name": "cbir-test", "StorageDirectory": os.path.join(folder, "storage"),
                       "IndexDirectory": os.path.join(folder, "storage"), "HttpPort": self.http_port,
                       "DicomPort": self.dicom_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(self.users),
                       "RegisteredUsers": self.users, "Plugins": [dicomweb_plugin()], "ConcurrentJobs": 1,
                       "HttpThreadsCount": 4, "StableAge": 1, "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}, handle)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def _request(self, path: str, data: bytes | None = None, method: str | None = None):
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if self.users:
            import base64

            user, password = next(iter(self.users.items()))
            request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    def start(self) -> OrthancServer:
        """Start Orthanc and wait until its REST API and the DICOMweb plugin answer."""
        log = open(os.path.join(self.folder, "orthanc.log"), "ab")
        self.process = subprocess.Popen([ORTHANC, self.config], stdout=log, stderr=subprocess.STDOUT, cwd=self.folder)
        log.close()
        deadline = time.monotonic() + 120  # a watchdog for a server that never comes up, generous for loaded machines
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}; see {self.folder}/orthanc.log")
            try:
                self._request("/dicom-web/studies?limit=1")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer on port {self.http_port} within 120 s; see {self.folder}/orthanc.log")

    def stop(self) -> None:
        """Stop the process this object started (SIGTERM, then SIGKILL after 1 s: its storage is a test's temporary folder,
        and a graceful stop waits seconds for idle keep-alive connections)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(1)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """Kill the server at once, as a crash would."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def upload(self, series: list[SeriesInfo]) -> None:
        """Store every file of the series over Orthanc's REST API (POST /instances)."""
        for info in series:
            for path in info.files:
                with open(path, "rb") as handle:
                    self._request("/instances", data=handle.read(), method="POST")

    def delete_study(self, study_uid: str) -> None:
        """Delete a study by its StudyInstanceUID."""
        found = self._request("/tools/lookup", data=study_uid.encode(), method="POST")
        for entry in found:
            if entry["Type"] == "Study":
                self._request(entry["Path"], method="DELETE")


class FaultyProxy:
    """An HTTP proxy in front of a server that fails the WADO-RS fetch of chosen series: 'http-500', 'cut' (half the
    answer, then the connection closes), 'slow' (answers after ``delay`` seconds). Everything else passes through."""

    def __init__(self, target: str, delay: float = 3.0):
        import http.server
        import threading

        self.target = target.rstrip("/")
        self.faults: dict[str, str] = {}
        self.delay = delay
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_GET(self) -> None:
                fault = next((mode for series, mode in proxy.faults.items() if f"/series/{series}" in self.path), None)
                if fault == "http-500":
                    self.send_response(500, "Internal Server Error")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fault == "slow":
                    time.sleep(proxy.delay)
                request = urllib.request.Request(proxy.target + self.path)
                for name in ("Accept", "Authorization"):
                    if self.headers.get(name):
                        request.add_header(name, self.headers[name])
                try:
                    with urllib.request.urlopen(request, timeout=30) as answer:
                        status, headers, body = answer.status, answer.headers, answer.read()
                except urllib.error.HTTPError as error:
                    status, headers, body = error.code, error.headers, error.read()
                self.send_response(status)
                self.send_header("Content-Type", headers.get("Content-Type", "application/octet-stream"))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fault == "cut":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # the client hanging up on a cut answer is the point
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
