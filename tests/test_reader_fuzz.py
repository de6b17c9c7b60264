"""Whatever bytes a file holds, read_image returns a 2-D uint8 slice or raises ImageReadError: promptly, and without
allocating more than a slice's worth of memory.

The files are small real JPEG, PNG, DICOM and NIfTI files (the seeds) and hypothesis's variations of them: random
bytes, truncations, mutated header bytes and absurd declared sizes. Each is read in a worker process that runs
nothing else, so that a hang is cut off (a hard timeout), a memory blow-up is measured
(the worker's peak resident memory over one read) and bounded (an address-space limit), and a crash is seen.
"""

from __future__ import annotations

import gzip
import io
import json
import select
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the worker's memory guard reads /proc/self/status")

# The most one read may add to the worker's resident memory: one slice's worth. A slice at the readers' cap
# (MAX_SLICE_PIXELS, 16.8 megapixels) stays within a few hundred MB; reading the whole volume that a 2 MB .nii.gz
# declares took 7 GB, and a DICOM frame at Pillow's 89-megapixel limit over 2 GB (found here, in CI).
PEAK_MEMORY_MB = 1024
# beyond it, allocations fail (MemoryError) instead of taking the machine's memory. Generous, because a header field
# declaring 2-4 GB (a mutated DICOM length) makes Python reserve that much address space before reading the short
# file: reserved, never touched, so not a blow-up; real growth is what PEAK_MEMORY_MB bounds
ADDRESS_SPACE_HEADROOM = 6 << 30
HANG_SECONDS = 30  # the hard guard against a read that never ends
FUZZ = settings(
    max_examples=300,
    # no per-example deadline: on a loaded 2-core CI machine a slow example is not a failure (it made this flaky);
    # a hang is still cut off by the worker's hard HANG_SECONDS guard
    deadline=None,
    derandomize=True,  # the same examples on every run: CI is deterministic
    database=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# The worker imports brainscan's readers without the package's __init__ (which imports torch): a second to start.
WORKER = """
import importlib.util, json, resource, sys, types, warnings
package = types.ModuleType("brainscan")
package.__path__ = list(importlib.util.find_spec("brainscan").submodule_search_locations)
sys.modules["brainscan"] = package
import nibabel, numpy, pydicom, pydicom.pixels, PIL.Image
from brainscan.data.readers import ImageReadError, read_image
warnings.simplefilter("ignore")

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak resident size (VmHWM) starts again from the current one
        return True
    except OSError:
        return False  # then VmHWM is the lifetime peak: still a bound, measured from the start

resource.setrlimit(resource.RLIMIT_AS, (status("VmSize") + int(sys.argv[1]), resource.RLIM_INFINITY))
start = status("VmRSS")
print("ready", flush=True)
for line in sys.stdin:
    before = status("VmRSS") if reset_peak() else start
    try:
        out = read_image(line.rstrip("\\n"))
        result = {"shape": list(out.shape), "dtype": str(out.dtype), "std": float(out.std())}
    except ImageReadError as exc:
        result = {"refused": exc.reason, "cause": type(exc.__cause__).__name__ if exc.__cause__ else None}
    except Exception as exc:
        result = {"error": f"{type(exc).__name__}: {exc}"}
    result["grown_mb"] = (status("VmHWM") - before) / 2**20
    print(json.dumps(result), flush=True)
"""


class Worker:
    """One reader process, fed paths on stdin; answers one JSON line per path."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(ADDRESS_SPACE_HEADROOM)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self._line(timeout=120) == "ready\n", "the reader worker did not start"

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def _line(self, timeout: float) -> str | None:
        assert self.process is not None and self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        return self.process.stdout.readline() if ready else None

    def read(self, path: Path) -> dict:
        if self.process is None:
            self.start()
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(f"{path}\n")
        self.process.stdin.flush()
        line = self._line(HANG_SECONDS)
        if line:
            return json.loads(line)
        code = None if line is None else self.process.wait(timeout=30)  # "": the worker closed its output
        self.stop()  # the next example gets a fresh worker
        if code is None:
            pytest.fail(f"read_image hung for {HANG_SECONDS} s on {path.name} ({path.stat().st_size} bytes)")
        pytest.fail(f"the reader process died (exit {code}) on {path.name}")


@pytest.fixture(scope="module")
def worker() -> Iterator[Worker]:
    w = Worker()
    w.start()
    yield w
    w.stop()


@pytest.fixture(scope="module")
def case_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def check_read(worker: Worker, case_dir: Path, suffix: str, data: bytes) -> None:
    """The property: a 2-D uint8 array or ImageReadError (not from running out of memory), within the memory cap."""
    path = case_dir / f"case{suffix}"
    path.write_bytes(data)
    result = worker.read(path)
    assert "error" not in result, f"read_image raised {result['error']}"
    assert result.get("cause") != "MemoryError", f"read_image ran out of memory: {result['refused']}"
    if "refused" not in result:
        assert len(result["shape"]) == 2 and result["dtype"] == "uint8", result
    assert result["grown_mb"] < PEAK_MEMORY_MB, f"one read grew the process by {result['grown_mb']:.0f} MB"


# --- seeds: small real files -----------------------------------------------------------------------------------------


def _slice(size: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    head = ((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (0.4 * size) ** 2
    noise = np.random.default_rng(0).integers(0, 40, (size, size))
    return (head * (120 + xx * 3) + noise).clip(0, 255).astype(np.uint8)


def _pil(image: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **options)
    return out.getvalue()


def _dicom(frames: int = 1, rle: bool = False) -> bytes:
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, RLELossless

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3.4"  # fixed: the same seed on every run
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth = 2, -10, 400, 600
    pixels = np.stack([_slice().astype(np.uint16) * (4 + k) for k in range(frames)])
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()
    if rle:
        ds.compress(RLELossless, pixels if frames > 1 else pixels[0])
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _nifti(volume: np.ndarray, affine: np.ndarray) -> bytes:
    return nib.Nifti1Image(volume, affine).to_bytes()


_VOLUME = np.stack([_slice(24)[:, :20].astype(np.int16) * k for k in range(1, 8)], axis=-1)
_FLOAT_4D = np.stack([_VOLUME, _VOLUME[::-1]], axis=-1).astype(np.float32)
_FLOAT_4D[0, 0, 3, 0] = np.nan
SEEDS: dict[str, tuple[str, bytes]] = {
    "jpeg-grey": (".jpg", _pil(Image.fromarray(_slice()), "JPEG", quality=90)),
    "jpeg-rgb": (".jpeg", _pil(Image.fromarray(_slice()).convert("RGB"), "JPEG")),
    "png-grey": (".png", _pil(Image.fromarray(_slice()), "PNG")),
    "png-16bit": (".png", _pil(Image.fromarray(_slice().astype(np.uint16) * 257), "PNG")),
    "dicom": (".dcm", _dicom()),
    "dicom-multiframe": (".dcm", _dicom(frames=3)),
    "dicom-rle": (".dcm", _dicom(rle=True)),
    "nifti": (".nii", _nifti(_VOLUME, np.diag([-1.0, 1.0, 2.0, 1.0]))),
    "nifti-4d-float": (".nii", _nifti(_FLOAT_4D, np.eye(4))),
}
SEEDS.update({f"{name}.gz": (".nii.gz", gzip.compress(data, mtime=0)) for name, (_, data) in list(SEEDS.items())
              if name.startswith("nifti")})  # fmt: skip
SUFFIXES = sorted({suffix for suffix, _ in SEEDS.values()})


def _header_region(name: str, data: bytes) -> tuple[int, int]:
    """Where the seed's header lies: the bytes that say what the rest is."""
    if name.startswith("nifti"):
        return 0, 352
    if name.startswith("dicom"):
        return 0, data.rfind(b"\xe0\x7f\x10\x00")  # preamble, meta and data elements up to the pixel data
    if name.startswith("png"):
        return 8, 33  # the IHDR chunk: length, type, size, depth, colour type, CRC
    start = data.find(b"\xff\xc0")  # JPEG: the baseline start-of-frame segment, with the size in it
    return start, start + 2 + int.from_bytes(data[start + 2 : start + 4], "big")


def test_every_seed_reads_as_a_slice(worker: Worker, case_dir: Path) -> None:
    for name, (suffix, data) in SEEDS.items():
        (case_dir / f"case{suffix}").write_bytes(data)
        result = worker.read(case_dir / f"case{suffix}")
        assert result.get("dtype") == "uint8" and len(result["shape"]) == 2 and result["std"] > 1, (name, result)


# --- strategies ------------------------------------------------------------------------------------------------------

MAGIC = {
    ".jpg": b"\xff\xd8\xff",
    ".jpeg": b"\xff\xd8\xff\xe0",
    ".png": b"\x89PNG\r\n\x1a\n",
    ".dcm": bytes(128) + b"DICM",
    ".nii": struct.pack("<i", 348),
    ".nii.gz": b"\x1f\x8b\x08",
}


@st.composite
def random_files(draw: st.DrawFn) -> tuple[str, bytes]:
    """Random bytes with a reader's suffix, half of them behind the format's magic so that they get past sniffing."""
    suffix = draw(st.sampled_from(SUFFIXES))
    data = draw(st.binary(max_size=1024))
    return suffix, (MAGIC[suffix] + data if draw(st.booleans()) else data)


@st.composite
def truncated_seeds(draw: st.DrawFn) -> tuple[str, bytes]:
    suffix, data = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
    return suffix, data[: draw(st.integers(0, len(data) - 1))]


def _with_png_crc(data: bytes) -> bytes:
    """The PNG with its IHDR checksum made right again, so that Pillow reads the mutated header instead of refusing."""
    return data[:29] + struct.pack(">I", zlib.crc32(data[12:29])) + data[33:]


@st.composite
def header_mutations(draw: st.DrawFn) -> tuple[str, bytes]:
    """A seed with a few bytes of its header region replaced (inside the gzip stream for .nii.gz)."""
    name = draw(st.sampled_from(sorted(SEEDS)))
    suffix, data = SEEDS[name]
    if suffix == ".nii.gz":
        data = gzip.decompress(data)
    start, end = _header_region(name, data)
    mutated = bytearray(data)
    for position, value in draw(st.lists(st.tuples(st.integers(start, end - 1), st.integers(0, 255)), max_size=8)):
        mutated[position] = value
    data = bytes(mutated)
    if name.startswith("png") and draw(st.booleans()):
        data = _with_png_crc(data)
    return suffix, gzip.compress(data, mtime=0) if suffix == ".nii.gz" else data


SIDES = st.one_of(st.integers(0, 70_000), st.sampled_from([1, 8, 9_459, 65_535, 65_536, 2**31 - 1]))


@st.composite
def declared_sizes(draw: st.DrawFn) -> tuple[str, bytes]:
    """A seed whose header declares other sizes (and depths, frames, data types) than its data has."""
    name = draw(st.sampled_from(sorted(SEEDS)))
    suffix, data = SEEDS[name]
    if name.startswith("png"):
        size = struct.pack(">II", draw(SIDES) % 2**31, draw(SIDES) % 2**31)
        return suffix, _with_png_crc(data[:16] + size + data[24:])
    if name.startswith("jpeg"):
        sof = data.find(b"\xff\xc0")
        size = struct.pack(">HH", draw(SIDES) % 2**16, draw(SIDES) % 2**16)
        return suffix, data[: sof + 5] + size + data[sof + 9 :]
    if name.startswith("dicom"):
        ds = pydicom.dcmread(io.BytesIO(data))
        ds.Rows, ds.Columns = draw(SIDES) % 2**16, draw(SIDES) % 2**16
        ds.BitsAllocated = draw(st.sampled_from([0, 1, 8, 12, 16, 32, 64, 65_535]))
        ds.SamplesPerPixel = draw(st.sampled_from([0, 1, 3, 4, 65_535]))
        if draw(st.booleans()):
            ds.NumberOfFrames = draw(st.one_of(st.integers(0, 10), st.just(2**31 - 1)))
        out = io.BytesIO()
        ds.save_as(out)
        return suffix, out.getvalue()
    raw = gzip.decompress(data) if suffix == ".nii.gz" else data
    header = nib.Nifti1Header(raw[:348], check=False)
    ndim = draw(st.integers(0, 8))
    header["dim"] = [ndim] + [draw(SIDES) % 2**15 for _ in range(7)]
    header["datatype"] = draw(st.sampled_from([0, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 2304]))
    header["vox_offset"] = draw(st.sampled_from([0.0, 352.0, 348.0, 1e9, -5.0, float("nan")]))
    header["scl_slope"] = draw(st.sampled_from([0.0, 1.0, -2.5, float("nan"), float("inf")]))
    header["sform_code"] = draw(st.integers(0, 4))
    header["srow_x"] = [draw(st.sampled_from([0.0, 1.0, -1.0, float("nan")])) for _ in range(4)]
    raw = header.binaryblock + raw[348:]
    return suffix, gzip.compress(raw, mtime=0) if suffix == ".nii.gz" else raw


# --- the property ----------------------------------------------------------------------------------------------------


@FUZZ
@given(case=random_files())
def test_random_bytes_read_as_a_slice_or_refused_in_words(worker: Worker, case_dir: Path, case: tuple) -> None:
    check_read(worker, case_dir, *case)


@FUZZ
@given(case=truncated_seeds())
def test_truncated_files_read_as_a_slice_or_refused_in_words(worker: Worker, case_dir: Path, case: tuple) -> None:
    check_read(worker, case_dir, *case)


@FUZZ
@given(case=header_mutations())
def test_mutated_headers_read_as_a_slice_or_refused_in_words(worker: Worker, case_dir: Path, case: tuple) -> None:
    check_read(worker, case_dir, *case)


@FUZZ
@given(case=declared_sizes())
def test_absurd_declared_sizes_are_refused_within_bounded_memory(worker: Worker, case_dir: Path, case: tuple) -> None:
    check_read(worker, case_dir, *case)
