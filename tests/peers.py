"""Reusable DICOM test peers and data: synthetic CT series, DCMTK tools, Orthanc.

* :func:`make_ct_series` writes a small synthetic head CT series with pydicom (any geometry,
  compression via pydicom encoders or DCMTK ``dcmcjpeg``/``dcmcrle``).
* :func:`free_port`, :func:`wait_port` pick and poll loopback ports; :func:`serving` runs a
  ``socketserver`` server (HL7, webhook receivers) in a thread.
* :class:`StoreSCP` runs DCMTK ``storescp`` on a free port (a destination that records files).
* :class:`Orthanc` runs an Orthanc server with its own configuration on free ports (a stand-in
  PACS): REST helpers to upload files, push to a modality and list what it holds.
* :func:`dcmtk` runs a DCMTK command line with ``TCP_NODELAY=1`` (see
  ``/work/shared/research/toolchain.md``: without it every C-STORE stalls ~44 ms).

Every process is started on 127.0.0.1 with ports chosen at run time and stopped by the
context manager / fixture that started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

DCMTK_ENV = {"TCP_NODELAY": "1"}


def dcmtk_env() -> dict[str, str]:
    """The environment for DCMTK processes: ``TCP_NODELAY=1`` and a PATH without this Python's
    script directory (pynetdicom installs console scripts named ``storescp``, ``storescu``,
    ``echoscu``... there, which would shadow DCMTK's in an activated virtual environment)."""
    env = dict(os.environ)
    env.update(DCMTK_ENV)
    scripts = {os.path.realpath(os.path.join(prefix, "bin")) for prefix in (sys.prefix, sys.exec_prefix)}
    env["PATH"] = os.pathsep.join(d for d in env.get("PATH", "").split(os.pathsep)
                                  if d and os.path.realpath(d) not in scripts)
    return env


def dcmtk(*args: str | os.PathLike[str], timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool (``storescu``, ``echoscu``, ``dcmcjpeg`` ...) with TCP_NODELAY=1."""
    return subprocess.run(
        [str(a) for a in args], env=dcmtk_env(), capture_output=True, text=True, timeout=timeout, check=check,
        stdin=subprocess.DEVNULL,
    )


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
    """Poll until something accepts TCP connections on ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f} s")


def wait_for(predicate: Any, timeout: float = 60.0, interval: float = 0.1, message: str = "condition") -> Any:
    """Poll ``predicate()`` until it returns a truthy value; return that value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {message}")
        time.sleep(interval)


@contextlib.contextmanager
def serving(server: Any) -> Iterator[Any]:
    """Run a ``socketserver`` server in a daemon thread; shut it down and close it on exit."""
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        t.join(timeout=10)


# --------------------------------------------------------------------------- synthetic CT
@dataclass
class SeriesSpec:
    """Geometry and tags of a synthetic CT series (defaults: 20 axial head slices, 64x64)."""

    slices: int = 20
    size: int = 64
    spacing: float = 5.0  # mm between slice centres along the normal
    thickness: float = 5.0
    pixel_spacing: float = 0.5
    tilt_deg: float = 0.0  # gantry tilt about the x axis
    orientation: tuple[float, ...] | None = None  # overrides tilt (e.g. sagittal)
    modality: str = "CT"
    body_part: str = "HEAD"
    series_description: str = "CT HEAD W/O"
    study_description: str = "CT BRAIN"
    kernel: str = "STANDARD"
    contrast: str = ""
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    images_in_acquisition: bool = True
    study_uid: str = field(default_factory=generate_uid)
    series_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)  # one per series (highdicom checks)
    patient_id: str = "TEST0001"
    patient_name: str = "Test^Patient"
    accession: str = "ACC0001"
    extra: dict[str, Any] = field(default_factory=dict)  # keyword -> value set on every slice
    positions: Sequence[float] | None = None  # explicit offsets along the normal (mm)


def head_phantom(size: int, z_frac: float) -> np.ndarray:
    """A crude head: air outside, skull ring (~1000 HU), brain (~35 HU); returns HU int16."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2
    r = np.hypot(yy - c, xx - c) / (size / 2)
    scale = max(0.3, np.sin(np.pi * min(max(z_frac, 0.05), 0.95)))
    hu = np.full((size, size), -1000, np.int16)
    hu[r < 0.9 * scale] = 1000
    hu[r < 0.8 * scale] = 35
    hu[(r < 0.2 * scale) & (yy > c)] = 70  # a bright blob, so orientation can be checked
    return hu


def make_ct_dataset(spec: SeriesSpec, index: int, offset: float) -> Dataset:
    """One CT Image Storage slice (uncompressed, little endian explicit)."""
    t = np.radians(spec.tilt_deg)
    iop = list(spec.orientation) if spec.orientation else [1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(-np.sin(t))]
    row, col = np.array(iop[:3]), np.array(iop[3:])
    normal = np.cross(row, col)
    origin = np.array([-spec.size * spec.pixel_spacing / 2, -spec.size * spec.pixel_spacing / 2, 0.0])
    ipp = origin + normal * offset
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(spec.image_type)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = spec.accession
    ds.Modality = spec.modality
    ds.Manufacturer = "SYNTHETIC"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = spec.study_description
    ds.SeriesDescription = spec.series_description
    ds.PatientName = spec.patient_name
    ds.PatientID = spec.patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.BodyPartExamined = spec.body_part
    ds.SliceThickness = f"{spec.thickness:g}"
    ds.KVP = "120"
    ds.GantryDetectorTilt = f"{spec.tilt_deg:g}"
    ds.ConvolutionKernel = spec.kernel
    if spec.contrast:
        ds.ContrastBolusAgent = spec.contrast
    ds.StudyInstanceUID = spec.study_uid
    ds.SeriesInstanceUID = spec.series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in iop]
    ds.FrameOfReferenceUID = spec.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    if spec.images_in_acquisition:
        ds.ImagesInAcquisition = spec.slices
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = spec.size
    ds.PixelSpacing = [f"{spec.pixel_spacing:g}", f"{spec.pixel_spacing:g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "80"
    n = max(spec.slices - 1, 1)
    hu = head_phantom(spec.size, index / n)
    ds.PixelData = (hu.astype(np.int32) + 1024).astype(np.int16).tobytes()
    for keyword, value in spec.extra.items():
        setattr(ds, keyword, value)
    return ds


def make_ct_series(
    directory: Path, spec: SeriesSpec | None = None, *, transfer_syntax: str | None = None, shuffle: bool = False
) -> list[Path]:
    """Write a synthetic CT series into ``directory``; return the paths (file names are not in
    spatial order when ``shuffle``). ``transfer_syntax`` re-encodes with pydicom (RLE, JPEG-LS,
    JPEG 2000, deflate, implicit ...)."""
    spec = spec or SeriesSpec()
    directory.mkdir(parents=True, exist_ok=True)
    offsets = list(spec.positions) if spec.positions is not None else [i * spec.spacing for i in range(spec.slices)]
    order = list(range(len(offsets)))
    if shuffle:
        order = list(np.random.default_rng(7).permutation(len(offsets)))
    paths = []
    for k, i in enumerate(order):
        ds = make_ct_dataset(spec, i, offsets[i])
        if transfer_syntax == ImplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        elif transfer_syntax == "1.2.840.10008.1.2.1.99":  # Deflated Explicit VR Little Endian
            ds.file_meta.TransferSyntaxUID = transfer_syntax
        elif transfer_syntax and transfer_syntax != ExplicitVRLittleEndian:
            ds.compress(transfer_syntax)
        path = directory / f"f{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def compress_with_dcmtk(paths: Sequence[Path], out_dir: Path, tool: str, *options: str) -> list[Path]:
    """Compress files with ``dcmcjpeg`` or ``dcmcrle`` (default options: JPEG lossless / RLE)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for p in paths:
        target = out_dir / p.name
        dcmtk(tool, *options, p, target)
        out.append(target)
    return out


# --------------------------------------------------------------------------- DCMTK storescp
class StoreSCP:
    """DCMTK ``storescp`` on a free port, writing into ``directory``.

    Extra ``args`` inject faults (``--refuse``, ``--reject``, ``--abort-after``, ``--sleep-during N``);
    ``accept_all=False`` makes it accept uncompressed transfer syntaxes only.
    """

    def __init__(self, directory: Path, aet: str = "STORESCP", *args: str, accept_all: bool = True) -> None:
        if shutil.which("storescp", path=dcmtk_env()["PATH"]) is None:
            raise RuntimeError("DCMTK storescp is not installed (scripts/setup.sh)")
        self.directory = directory
        self.aet = aet
        self.args = (*(("+xa",) if accept_all else ()), *args)  # +xa: accept every transfer syntax
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a port picked free may be taken meanwhile: retry
            self.port = free_port()
            self.proc = subprocess.Popen(
                ["storescp", "--aetitle", self.aet, "--output-directory", str(self.directory),
                 *self.args, str(self.port)],
                env=dcmtk_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            try:
                wait_port(self.port, timeout=15)
                return self
            except TimeoutError:
                self.stop()
        raise RuntimeError("storescp did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def files(self) -> list[Path]:
        return sorted(p for p in self.directory.iterdir() if p.is_file())

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- Orthanc
class Orthanc:
    """An Orthanc server (stand-in PACS) with its own configuration on free ports.

    ``modalities`` maps a name to (AET, host, port) of DICOM peers it may push to / accept from.
    """

    def __init__(self, workdir: Path, aet: str = "ORTHANC", modalities: dict[str, tuple[str, str, int]] | None = None,
                 python_plugin: str | None = None) -> None:
        if shutil.which("Orthanc") is None:
            raise RuntimeError("Orthanc is not installed (scripts/setup.sh)")
        self.workdir = workdir
        self.aet = aet
        self.modalities = modalities or {}
        self.python_plugin = python_plugin
        self.http_port = 0
        self.dicom_port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> Orthanc:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self.http_port, self.dicom_port = free_port(), free_port()
        config: dict[str, Any] = {
            "Name": "PACS-STANDIN",
            "StorageDirectory": str(self.workdir / "db"),
            "IndexDirectory": str(self.workdir / "db"),
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": True,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "SaveJobs": False,
            "StableAge": 2,
            "HttpTimeout": 60,
            "DicomScuTimeout": 30,
        }
        if self.python_plugin:
            config["Plugins"] = ["/usr/share/orthanc/plugins"]
            config["PythonScript"] = self.python_plugin
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=1))
        self.log = (self.workdir / "logs" / "stdout.txt").open("wb")
        self.proc = subprocess.Popen(
            ["Orthanc", f"--logdir={self.workdir / 'logs'}", str(cfg)],
            env=dcmtk_env(), stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
        )
        try:
            wait_for(self._alive, timeout=60, message="Orthanc REST API")
            wait_port(self.dicom_port, timeout=30)
        except TimeoutError:
            self.stop()
            raise
        return self

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {self.proc.returncode}; see {self.workdir / 'logs'}")
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # REST
    def request(self, method: str, path: str, body: bytes | None = None, content_type: str = "application/json",
                timeout: float = 120) -> Any:
        req = urllib.request.Request(self.url + path, data=body, method=method, headers={"Content-Type": content_type})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            data = resp.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def get(self, path: str) -> Any:
        return self.request("GET", path, timeout=10)

    def post_json(self, path: str, payload: Any, timeout: float = 300) -> Any:
        return self.request("POST", path, json.dumps(payload).encode(), timeout=timeout)

    def upload(self, paths: Sequence[Path]) -> list[dict[str, Any]]:
        return [self.request("POST", "/instances", Path(p).read_bytes(), "application/dicom") for p in paths]

    def put_modality(self, name: str, aet: str, host: str, port: int) -> None:
        self.request("PUT", f"/modalities/{name}", json.dumps({"AET": aet, "Host": host, "Port": port}).encode())

    def store_to(self, modality: str, resources: Sequence[str], timeout: float = 300) -> Any:
        """C-STORE resources (Orthanc ids) to a modality synchronously; raises on failure."""
        return self.post_json(f"/modalities/{modality}/store",
                              {"Resources": list(resources), "Synchronous": True}, timeout=timeout)

    def instance_uids(self) -> set[str]:
        ids = self.get("/instances")
        return {self.get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in ids}


@contextlib.contextmanager
def orthanc(workdir: Path, **kwargs: Any) -> Iterator[Orthanc]:
    server = Orthanc(workdir, **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- the node itself
def node_context(tmp_path: Path, database_url: str | None = None, **overrides: Any) -> Any:
    """A migrated :class:`~triage.context.AppContext` (SQLite under ``tmp_path`` unless a URL is
    given) with test settings plus ``overrides`` (setting name -> value)."""
    from storage.migrate import upgrade
    from tests.conftest import make_settings
    from triage.context import AppContext

    url = database_url or f"sqlite:///{tmp_path / 'triage.sqlite3'}"
    upgrade(url)
    return AppContext(make_settings(tmp_path, database_url=url, **overrides), role="test")


@contextlib.contextmanager
def running_node(ctx: Any) -> Iterator[Any]:
    """A :class:`~triage.dicom.scp.DicomNode` on 127.0.0.1 and a free port, stopped afterwards."""
    from triage.dicom.scp import DicomNode

    node = DicomNode(ctx, host="127.0.0.1", port=0)
    node.start()
    try:
        yield node
    finally:
        node.stop()


# storescu proposes uncompressed syntaxes only unless told: the flag that proposes each syntax.
STORESCU_PROPOSE = {
    "1.2.840.10008.1.2": "-xi",
    "1.2.840.10008.1.2.1": "-xe",
    "1.2.840.10008.1.2.1.99": "-xd",
    "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.50": "-xy",
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
}


def storescu(port: int, paths: Sequence[Path], *, calling: str = "STORESCU", called: str = "ICHTRIAGE",
             extra: Sequence[str] = (), check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """DCMTK ``storescu`` of ``paths`` to 127.0.0.1:``port`` (proposes every syntax the files use)."""
    return dcmtk("storescu", "-aet", calling, "-aec", called, "-R", *extra, "127.0.0.1", str(port), *paths,
                 timeout=timeout, check=check)


def make_result_object(ctx: Any, tmp_path: Path, name: str = "obj") -> int:
    """A stand-in result object (one CT slice, kind ``sc``) with study/series/result rows and its file
    in the file store; returns the ResultObject id (for ``deliver`` jobs)."""
    from pydicom import dcmread

    from storage.models import Result, ResultObject, Series, Study
    src = make_ct_series(tmp_path / name, SeriesSpec(slices=1, size=32, accession="ACC-D1"))[0]
    ds = dcmread(src)
    data = src.read_bytes()
    with ctx.sessions.begin() as s:
        study = Study(study_uid=str(ds.StudyInstanceUID), accession="ACC-D1")
        s.add(study)
        s.flush()
        series = Series(study_id=study.id, series_uid=str(ds.SeriesInstanceUID), modality="CT")
        s.add(series)
        s.flush()
        result = Result(study_id=study.id, series_id=series.id)
        s.add(result)
        s.flush()
        rel = ctx.store.result_rel(study.study_uid, series.series_uid, f"{ds.SOPInstanceUID}.dcm")
        ctx.store.write_atomic(rel, data)
        obj = ResultObject(result_id=result.id, kind="sc", sop_class_uid=str(ds.SOPClassUID),
                           sop_instance_uid=str(ds.SOPInstanceUID), series_uid=series.series_uid, path=rel,
                           size=len(data))
        s.add(obj)
        s.flush()
        return obj.id
