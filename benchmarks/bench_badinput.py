"""Bad-input benchmark: does every command refuse broken, hostile and odd files with a reason, and accept odd good ones?

    python benchmarks/bench_badinput.py [--work DIR] [--timeout 120] [--file-timeout 30] [--max-rss-mb 4096]
                                        [--seed 0] [--check]

Generates (seeded, deterministic) a corpus of ~110 files in ~27 kinds, each with the verdict it should get:
"refuse" (zero-byte, truncated JPEG/PNG/NIfTI/DICOM, text and HTML named as images, random bytes and magic numbers
followed by random bytes under every suffix, PNG/JPEG headers declaring decompression bombs, NIfTI full of NaN,
DICOM with huge Rows/Columns, no pixel data or garbage compressed data, FIFOs, links to /dev/zero, a dangling link,
folders named like images) or "accept" (a 1024³ int16 NIfTI of zeros, 4-D NIfTI, NIfTI with some NaN, 16-bit
PNG/TIFF, images behind the wrong suffix, file names holding Rich markup, plain controls) or "predict-only" (file
names holding bytes that are not UTF-8: predicted one by one, left out of a dataset with the reason, as its paths go
into CSV, JSON and YAML).
Then, each in its own process group, with a timeout (a hang is killed and counted as "hung") and a memory cap (a
child whose resident memory passes --max-rss-mb is killed and counted as crashed):

* per file: ``predict_files`` on each file alone, in one worker process that loads the checkpoint once (a
  ``brainscan`` start costs seconds); an exception other than ``ImageReadError`` is a crash, a file running past
  --file-timeout (``signal.alarm``, or the parent's watchdog when the worker is stuck in C) is a hang, and after
  either the worker restarts at the next file. This is the per-file verdict;
* ``brainscan predict --json`` on every file at once (stdout's JSON lines and stderr's list of skipped inputs);
* ``brainscan train`` on good images plus the corpus split over yes/ and no/ (must exit 0, and its run's
  skipped.csv must list every file to refuse with a reason; split.csv tells which files it used);
* ``brainscan audit`` on that folder (must exit 0; audit.json's ``unreadable.files`` must list every file to refuse).

Outcomes per file and command: refused (with a reason), accepted, crashed, hung, or wrong (a file to refuse that
was used, a file to accept that was refused, a refusal without a reason, or a file the command's output does not
mention). A file's overall outcome is its worst over the four. A whole command that crashes (a traceback with a
non-zero exit, a signal, the memory cap) or fails (an exit code it should not give: predict 0 or 1, train and audit
0) counts under ``commands_crashed``, one that hangs under ``commands_hung``; the files it never reported on then
count for nothing under that command (the per-file pass still judges each of them).
Peak memory is the kernel's high-water mark (``ru_maxrss``) of each child and its reaped descendants, from
``os.wait4`` on that child alone, so runs do not blur (``RUSAGE_CHILDREN`` would give the maximum over all of them),
or the process tree's summed VmRSS as sampled every 50 ms when that is higher (a killed tree reaps nothing).

Prints a table per kind, every failure with its first stderr line, and, as its last line, one JSON object:
``files``, ``kinds``, ``tried`` (files given an outcome), ``refused_with_reason``, ``accepted``, ``crashed``, ``hung``,
``wrong_verdict`` (overall outcomes, summing to ``tried``), ``commands_crashed``, ``commands_hung``, ``by_command``
(the same counts per command), ``peak_rss_mb`` (``predict``: the CLI batch, ``predict_per_file``: the worker(s),
``train``, ``audit``) and ``seconds``. Exit code 0, or with --check 1 when anything crashed, hung or was wrong.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BRAINSCAN = [sys.executable, "-m", "brainscan"]
TINY = ["--model", "cnn", "--epochs", "1", "--image-size", "32", "--no-confound-check", "-q"]
COMMANDS = ("per_file", "predict", "train", "audit")
OUTCOMES = ("refused", "accepted", "crashed", "hung", "wrong")
RANK = {"refused": 0, "accepted": 0, "wrong": 1, "crashed": 2, "hung": 3}
SKIP_HEADING = "that could not be read:"
WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ")


# ------------------------------------------------------------------------------------------------ the corpus


@dataclass
class Entry:
    """One corpus file: ``rel`` is its path under the corpus folder (may hold a folder, and surrogate escapes)."""

    rel: str
    kind: str
    expected: str  # "refuse", "accept", or "predict-only" (predicted one by one; refused with a reason in a dataset)
    data: bytes | None = None  # the file's bytes; None for the special kinds below
    special: str | None = None  # "fifo", "link:<target>", "dir"

    def create(self, folder: Path) -> Path:
        path = folder / self.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.special == "fifo":
            os.mkfifo(path)
        elif self.special == "dir":
            path.mkdir()
        elif self.special and self.special.startswith("link:"):
            os.symlink(self.special[5:], path)
        else:
            path.write_bytes(self.data or b"")
        return path


def display(path: str | os.PathLike[str]) -> str:
    """A path as printable text, undecodable bytes as backslash escapes (what brainscan prints for them)."""
    try:
        from brainscan.errors import display_path

        return display_path(path)
    except ImportError:  # an older brainscan: the same rule
        return os.fsdecode(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def texture(rng: np.random.Generator, size: int = 64, cells: int = 8) -> np.ndarray:
    """A smooth random grey image: a coarse random grid upsampled, plus noise (distinct per call, no duplicates)."""
    coarse = Image.fromarray(rng.integers(0, 256, (cells, cells), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    return np.clip(smooth + rng.normal(0, 12, (size, size)), 0, 255).astype(np.uint8)


def encode(array: np.ndarray, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int, idat: bytes) -> bytes:
    """An 8-bit grey PNG whose IHDR declares ``width`` × ``height``, with the given compressed IDAT."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def real_png_bomb(side: int) -> bytes:
    """A genuine ``side`` × ``side`` all-black PNG: gigapixel-scale when decoded, a few hundred KB on disk."""
    packer = zlib.compressobj(9)
    rows = bytes((side + 1) * 500)  # 500 rows of filter byte + pixels
    idat = b"".join(packer.compress(rows) for _ in range(side // 500)) + packer.flush()
    return png_declaring(side, side, idat)


def jpeg_declaring(jpeg: bytes, height: int, width: int) -> bytes:
    """``jpeg`` with its SOF0 frame header rewritten to declare ``height`` × ``width``."""
    at = jpeg.index(b"\xff\xc0")
    return jpeg[: at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9 :]


def nifti_bytes(array: np.ndarray, gz: bool) -> bytes:
    import nibabel as nib

    data = nib.Nifti1Image(array, np.eye(4)).to_bytes()
    return gzip.compress(data, compresslevel=6, mtime=0) if gz else data


def huge_zero_nifti_gz(side: int = 1024) -> bytes:
    """A ``side``³ int16 volume of zeros as .nii.gz, streamed (2 GiB of voxels, about 2 MB of file)."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((side, side, side))
    header.set_data_dtype(np.int16)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9, mtime=0) as f:
        f.write(header.binaryblock + b"\x00" * 4)  # 348-byte header, then the empty extension flag
        chunk = bytes(1 << 24)
        remaining = side**3 * 2
        while remaining:
            f.write(chunk[: min(remaining, len(chunk))])
            remaining -= min(remaining, len(chunk))
    return out.getvalue()


def dicom_bytes(
    name: str,
    rows: int | None,
    columns: int | None,
    pixel_data: bytes | None,
    *,
    syntax: str = "1.2.840.10008.1.2.1",
    bits: int = 16,
    frames: int | None = None,
    window: bool = False,
) -> bytes:
    """A DICOM file (Part 10, MR image storage) with the given header fields; UIDs derive from ``name``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, MRImageStorage, generate_uid

    uid = generate_uid(entropy_srcs=[name])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = UID(syntax)
    ds = FileDataset(name, {}, file_meta=meta, preamble=b"\x00" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, uid
    ds.Modality, ds.PatientID = "MR", "BADINPUT"
    if rows is not None:
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if frames is not None:
        ds.NumberOfFrames = frames
    if window:
        ds.WindowCenter, ds.WindowWidth = 2000, 4000
    if pixel_data is not None:
        ds.PixelData = pixel_data
        compressed = UID(syntax).is_compressed
        ds["PixelData"].VR = "OB" if compressed or bits == 8 else "OW"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def build_corpus(seed: int) -> list[Entry]:
    """Every kind, several variants each, all derived from ``seed``."""
    rng = np.random.default_rng(seed)
    out: list[Entry] = []

    def add(rel: str, kind: str, expected: str, data: bytes | None = None, special: str | None = None) -> None:
        out.append(Entry(rel, kind, expected, data, special))

    suffixes = (".jpg", ".png", ".bmp", ".tif", ".dcm", ".nii", ".nii.gz")
    for suffix in suffixes:
        add(f"empty{suffix}", "zero_byte", "refuse", b"")

    jpeg = encode(texture(rng, 128, 32), "JPEG", quality=90)
    for cut in (2, 20, 0.25, 0.5, 0.75, 0.9):
        n = cut if isinstance(cut, int) else int(len(jpeg) * cut)
        add(f"cut{n}.jpg", "truncated_jpeg", "refuse", jpeg[:n])
    png = encode(rng.integers(0, 256, (128, 128), dtype=np.uint8), "PNG")  # noise: the IDAT is most of the file
    for cut in (8, 33, 0.25, 0.5, 0.75, 0.95):
        n = cut if isinstance(cut, int) else int(len(png) * cut)
        add(f"cut{n}.png", "truncated_png", "refuse", png[:n])

    add("notes.jpg", "text_named_image", "refuse", b"hello, this is not an image\n")
    add("table.png", "text_named_image", "refuse", b"path,label\nscan1.jpg,yes\nscan2.jpg,no\n")
    add("lorem.jpg", "text_named_image", "refuse", b"Lorem ipsum dolor sit amet. " * 400)
    add("data.png", "text_named_image", "refuse", json.dumps({"image": "scan.png", "pixels": [0] * 50}).encode())
    page = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>\n"
    add("download.jpg", "html_named_image", "refuse", page)
    add("download.png", "html_named_image", "refuse", page.replace(b"404 Not Found", b"Sign in"))
    add("viewer.jpg", "html_named_image", "refuse", b"<html><body><img src='data:image/png;base64,iVBORw0KGgo='>")

    for size in (64, 4096):
        for suffix in suffixes:
            add(f"random{size}{suffix}", "random_bytes", "refuse", rng.bytes(size))
    magic = {
        ".png": b"\x89PNG\r\n\x1a\n",
        ".jpg": b"\xff\xd8\xff\xe0",
        ".bmp": b"BM",
        ".tif": b"II*\x00",
        ".dcm": b"\x00" * 128 + b"DICM",
        ".nii.gz": b"\x1f\x8b\x08\x00",
    }
    for suffix, prefix in magic.items():
        add(f"magic{suffix}", "magic_then_random", "refuse", prefix + rng.bytes(2048))

    tiny_idat = zlib.compress(bytes(64))
    for width, height in ((30000, 30000), (10000, 10000), (46341, 46341), (70000, 16)):
        add(f"bomb{width}x{height}.png", "png_bomb", "refuse", png_declaring(width, height, tiny_idat))
    add("bomb20000x20000-real.png", "png_bomb", "refuse", real_png_bomb(20000))
    small_jpeg = encode(texture(rng, 64), "JPEG", quality=90)
    for side in (60000, 40000, 10000):
        add(f"bomb{side}x{side}.jpg", "jpeg_bomb", "refuse", jpeg_declaring(small_jpeg, side, side))

    add("zeros1024cubed.nii.gz", "nifti_huge_zeros", "accept", huge_zero_nifti_gz(1024))

    four_d = rng.normal(100, 20, (32, 32, 8, 3)).astype(np.float32)
    add("volume4d.nii", "nifti_4d", "accept", nifti_bytes(four_d, gz=False))
    other_4d = rng.normal(100, 20, four_d.shape).astype(np.float32)  # not a copy: train would see two labels
    add("volume4d.nii.gz", "nifti_4d", "accept", nifti_bytes(other_4d, gz=True))
    series = np.zeros((64, 64, 16, 200), np.int16)
    series[..., 0] = rng.integers(0, 1000, (64, 64, 16))
    add("series200.nii.gz", "nifti_4d", "accept", nifti_bytes(series, gz=True))

    shape = (32, 32, 8)
    add("allnan.nii", "nifti_all_nan", "refuse", nifti_bytes(np.full(shape, np.nan, np.float32), gz=False))
    add("allinf.nii.gz", "nifti_all_nan", "refuse", nifti_bytes(np.full(shape, np.inf, np.float32), gz=True))
    mixed = np.where(rng.random(shape) < 0.5, np.nan, -np.inf).astype(np.float32)
    add("nan-and-inf.nii", "nifti_all_nan", "refuse", nifti_bytes(mixed, gz=False))
    some = rng.normal(500, 100, shape).astype(np.float32)
    some[rng.random(shape) < 0.1] = np.nan
    add("somenan.nii", "nifti_some_nan", "accept", nifti_bytes(some, gz=False))
    band = rng.normal(500, 100, shape).astype(np.float32)
    band[10:14] = np.nan
    add("nanband.nii.gz", "nifti_some_nan", "accept", nifti_bytes(band, gz=True))
    spiky = rng.normal(500, 100, shape).astype(np.float32)
    spiky[rng.random(shape) < 0.05] = np.inf
    spiky[rng.random(shape) < 0.05] = np.nan
    add("inf-and-nan.nii", "nifti_some_nan", "accept", nifti_bytes(spiky, gz=False))

    volume = nifti_bytes(rng.normal(0, 1, shape).astype(np.float32), gz=False)
    add("cut-volume.nii", "truncated_nifti", "refuse", volume[: 352 + (len(volume) - 352) // 2])
    zipped = nifti_bytes(rng.normal(0, 1, shape).astype(np.float32), gz=True)
    add("cut-volume.nii.gz", "truncated_nifti", "refuse", zipped[: len(zipped) // 2])

    for rows, columns in ((60000, 60000), (65535, 65535), (30000, 30000)):
        add(
            f"huge{rows}x{columns}.dcm", "dicom_huge_dims", "refuse", dicom_bytes(f"h{rows}", rows, columns, bytes(100))
        )
    add("million-frames.dcm", "dicom_huge_dims", "refuse", dicom_bytes("mf", 64, 64, bytes(8192), frames=1_000_000))
    add("nopixels.dcm", "dicom_no_pixeldata", "refuse", dicom_bytes("np1", 64, 64, None))
    add("header-only.dcm", "dicom_no_pixeldata", "refuse", dicom_bytes("np2", None, None, None))

    from pydicom.encaps import encapsulate

    garbage = encapsulate([b"\xff\xd8" + rng.bytes(3000)])
    for label, syntax in (
        ("jpeg-baseline", "1.2.840.10008.1.2.4.50"),
        ("jpeg-ls", "1.2.840.10008.1.2.4.80"),
        ("jpeg2000", "1.2.840.10008.1.2.4.90"),
        ("rle", "1.2.840.10008.1.2.5"),
    ):
        bits = 8 if label == "jpeg-baseline" else 16
        data = dicom_bytes(label, 256, 256, garbage, syntax=syntax, bits=bits)
        add(f"garbage-{label}.dcm", "dicom_compressed_garbage", "refuse", data)

    pixels = rng.integers(0, 4000, (256, 256), dtype=np.uint16)
    whole = dicom_bytes("trunc", 256, 256, pixels.tobytes(), window=True)
    for cut in (140, 260, 0.5, 0.95):
        n = cut if isinstance(cut, int) else int(len(whole) * cut)
        add(f"cut{n}.dcm", "dicom_truncated", "refuse", whole[:n])

    for suffix in (".jpg", ".png", ".dcm", ".nii.gz"):
        add(f"fifo{suffix}", "fifo", "refuse", special="fifo")
    for suffix in (".jpg", ".png", ".dcm", ".nii"):
        add(f"devzero{suffix}", "symlink_dev_zero", "refuse", special="link:/dev/zero")
    add("gone.jpg", "dangling_symlink", "refuse", special="link:/nonexistent/brainscan-badinput/gone.png")
    for name in ("x.jpg", "folder.png", "folder.nii.gz"):
        add(name, "directory_named_image", "refuse", special="dir")

    add("x[/bold].png", "markup_name", "accept", encode(texture(rng), "PNG"))  # the folder "x[" holds "bold].png"
    add("[red]y.png", "markup_name", "accept", encode(texture(rng), "PNG"))
    add("[bold]z.jpg", "markup_name", "accept", encode(texture(rng), "JPEG", quality=95))
    add("[link=https://example.org]w.png", "markup_name", "accept", encode(texture(rng), "PNG"))
    add("a[b]c.png", "markup_name", "accept", encode(texture(rng), "PNG"))
    # a dataset's paths go into CSV, JSON and YAML, which hold only Unicode: train/audit skip these with the reason
    add(os.fsdecode(b"bad\xff\xfe.png"), "non_utf8_name", "predict-only", encode(texture(rng), "PNG"))
    add(os.fsdecode(b"\xc3(scan.jpg"), "non_utf8_name", "predict-only", encode(texture(rng), "JPEG", quality=95))

    add("png-inside.jpg", "wrong_suffix_valid", "accept", encode(texture(rng), "PNG"))
    add("jpeg-inside.png", "wrong_suffix_valid", "accept", encode(texture(rng), "JPEG", quality=95))
    add("bmp-inside.tif", "wrong_suffix_valid", "accept", encode(texture(rng), "BMP"))
    add("png-inside.bmp", "wrong_suffix_valid", "accept", encode(texture(rng), "PNG"))

    ramp = (texture(rng).astype(np.uint16) * 200 + 300).astype(np.uint16)
    add("sixteen-bit.png", "png16", "accept", encode(ramp, "PNG"))
    add("sixteen-bit-full.png", "png16", "accept", encode(rng.integers(0, 65536, (64, 64), dtype=np.uint16), "PNG"))
    add("sixteen-bit.tif", "png16", "accept", encode((texture(rng).astype(np.uint16) * 256), "TIFF"))

    add("control.png", "valid_control", "accept", encode(texture(rng), "PNG"))
    add("control.jpg", "valid_control", "accept", encode(texture(rng), "JPEG", quality=95))
    control = rng.integers(0, 4000, (64, 64), dtype=np.uint16)
    add("control.dcm", "valid_control", "accept", dicom_bytes("control", 64, 64, control.tobytes(), window=True))
    add(
        "control.nii.gz",
        "valid_control",
        "accept",
        nifti_bytes(rng.normal(0, 1, (48, 48, 12)).astype(np.float32), True),
    )
    return out


def write_good(folder: Path, seed: int, per_class: int = 10) -> None:
    """``per_class`` distinct synthetic slices in ``yes/`` (with a bright blob) and ``no/``."""
    rng = np.random.default_rng(seed + 1)
    yy, xx = np.mgrid[:64, :64]
    for label in ("yes", "no"):
        (folder / label).mkdir(parents=True)
        for i in range(per_class):
            image = texture(rng).astype(np.float32) * 0.6
            if label == "yes":
                cy, cx = rng.integers(16, 48, 2)
                image += 100 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 40)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / label / f"good-{label}-{i:02d}.png")


# ------------------------------------------------------------------------------------------------ running children


@dataclass
class Run:
    argv: list[str]
    returncode: int | None  # None: killed by the benchmark (hung, or over the memory cap)
    hung: bool
    over_memory: bool
    seconds: float
    peak_rss_mb: float
    stdout: str
    stderr: str

    def status(self, ok_codes: tuple[int, ...]) -> tuple[str, str]:
        """("ok" | "crashed" | "hung" | "failed", a detail line) by the benchmark's definitions."""
        if self.hung:
            return "hung", f"no end after {self.seconds:.0f} s; process group killed"
        if self.over_memory:
            return "crashed", f"killed: resident memory above the cap (peak {self.peak_rss_mb:.0f} MB)"
        if self.returncode is not None and self.returncode < 0:
            return "crashed", f"killed by signal {-self.returncode} ({first_line(self.stderr)})"
        if self.returncode and "Traceback" in self.stderr:
            return "crashed", f"exit {self.returncode}: {first_line(self.stderr)} … {exception_line(self.stderr)}"
        if self.returncode not in ok_codes:
            return "failed", f"exit {self.returncode}: {first_line(self.stderr)}"
        return "ok", f"exit {self.returncode}"


def is_warning(line: str) -> bool:
    """A line of a Python warning as ``warnings`` prints it (the message line, or the source line under it)."""
    return bool(WARNING.match(line)) or line.strip().startswith("warnings.warn(")


def warning_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if WARNING.match(line)]


def first_line(text: str) -> str:
    """stderr's ``error:`` line when it has one, else its first line that is not part of a Python warning."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    chosen = next((line for line in lines if line.startswith("error:")), None)
    chosen = chosen or next((line for line in lines if not is_warning(line)), None) or (lines[0] if lines else "")
    return chosen[:300] or "(no stderr)"


def exception_line(text: str) -> str:
    """The last line of the last traceback in ``text``: the exception's type and message."""
    lines = [line for line in text.splitlines() if line.strip()]
    last = max((i for i, line in enumerate(lines) if line.startswith("Traceback")), default=None)
    if last is None:
        return ""
    tail = [line for line in lines[last + 1 :] if not line.startswith((" ", "\t"))]
    return (tail[0] if tail else lines[-1]).strip()[:300]


def tree_rss_kb(pid: int) -> int:
    """Resident memory (VmRSS) of ``pid`` and its descendants, in kB; 0 for what has gone."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0)
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return total


def run(
    argv: list[str],
    logs: Path,
    name: str,
    *,
    timeout: float,
    max_rss_mb: float,
    progress: Path | None = None,
    stall: float | None = None,
    startup: float = 180,
    env: dict[str, str] | None = None,
) -> Run:
    """Run ``argv`` in a new process group; kill the group on ``timeout``, on ``max_rss_mb`` (all its processes'
    resident memory together), or when ``progress`` (a file the child appends to) has not grown for ``stall`` s,
    or has not appeared within ``startup`` s."""
    logs.mkdir(parents=True, exist_ok=True)
    out_path, err_path = logs / f"{name}.stdout", logs / f"{name}.stderr"
    started = time.monotonic()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True, cwd=REPO, env=env
        )
    hung = over_memory = False
    sampled_kb = 0  # the process tree's resident memory as sampled: all of it, also grandchildren never reaped
    last_size, last_change = -1, started
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        now = time.monotonic()
        if progress is not None and stall is not None:
            if progress.exists():
                size = progress.stat().st_size
                if size != last_size:
                    last_size, last_change = size, now
                hung = now - last_change > stall
            else:
                hung = now - started > startup
        hung = hung or now - started > timeout
        sampled_kb = max(sampled_kb, tree_rss_kb(proc.pid))
        over_memory = sampled_kb > max_rss_mb * 1024
        if hung or over_memory:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: keep Popen from waiting again
    seconds = time.monotonic() - started
    code = None if hung or over_memory else proc.returncode
    text = [p.read_bytes().decode("utf-8", "backslashreplace") for p in (out_path, err_path)]
    return Run(argv, code, hung, over_memory, seconds, max(usage.ru_maxrss, sampled_kb) / 1024, *text)


# ------------------------------------------------------------------------------------------------ per-file worker


def worker(checkpoint: str, files_json: str, log_path: str, file_timeout: int) -> None:
    """The per-file pass, inside one process: one JSON line per event appended to ``log_path``."""
    import resource

    from brainscan.data.readers import ImageReadError
    from brainscan.predict import Predictor, Skipped, predict_files

    class Watchdog(BaseException):
        pass

    def alarm(signum: int, frame: object) -> None:
        raise Watchdog

    signal.signal(signal.SIGALRM, alarm)
    files = json.loads(Path(files_json).read_text())
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu")
    with open(log_path, "a", encoding="utf-8") as log:

        def emit(record: dict) -> None:
            log.write(json.dumps(record) + "\n")
            log.flush()

        emit({"event": "ready", "maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
        for index, path in files:
            emit({"event": "start", "i": index})
            started = time.perf_counter()
            record: dict[str, object] = {"event": "done", "i": index}
            signal.alarm(file_timeout)
            try:
                results = list(predict_files(predictor, [path]))
                signal.alarm(0)
                if len(results) != 1:
                    record |= {"verdict": "crashed", "detail": f"predict_files gave {len(results)} results for 1 file"}
                elif isinstance(results[0], Skipped):
                    record |= {"verdict": "refused", "detail": results[0].reason}
                else:
                    record |= {"verdict": "accepted", "detail": f"predicted {results[0].label}"}
            except Watchdog:
                record |= {"verdict": "hung", "detail": f"no result after {file_timeout} s (signal.alarm)"}
            except ImageReadError as exc:  # escaped predict_files, but still a refusal with its reason
                signal.alarm(0)
                record |= {"verdict": "refused", "detail": exc.reason}
            except Exception as exc:  # a crash: anything else, BrainscanError and MemoryError included
                signal.alarm(0)
                frames = [f for f in traceback.extract_tb(exc.__traceback__) if "brainscan" in f.filename]
                where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
                message = (str(exc).splitlines() or [""])[0][:250]
                record |= {"verdict": "crashed", "detail": f"{type(exc).__name__}: {message}{where}"}
            record["seconds"] = round(time.perf_counter() - started, 3)
            record["maxrss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            emit(record)


@dataclass
class Verdict:
    outcome: str  # raw: refused, accepted, crashed, hung, missing, unreached
    detail: str = ""
    extra: dict[str, float] = field(default_factory=dict)


def per_file_pass(
    entries: list[Entry], paths: list[Path], ckpt: Path, logs: Path, args: argparse.Namespace
) -> tuple[list[Verdict], float, list[str]]:
    """Verdicts of the worker; a worker that dies, hangs in C or passes the memory cap is restarted at the next file."""
    verdicts: dict[int, Verdict] = {}
    remaining = list(range(len(entries)))
    peak, notes, attempt = 0.0, [], 0
    while remaining:
        attempt += 1
        files_json, log = logs / f"per-file-{attempt}.json", logs / f"per-file-{attempt}.jsonl"
        files_json.write_text(json.dumps([[i, os.fspath(paths[i])] for i in remaining]))
        argv = [sys.executable, __file__, "--worker", str(ckpt), str(files_json), str(log), str(args.file_timeout)]
        # the worker's log appears once it has imported torch and loaded the checkpoint; then a file whose alarm
        # cannot fire (a read blocked in C with the signal pending) stalls the log for longer than the alarm
        result = run(
            argv,
            logs,
            f"per-file-{attempt}",
            timeout=args.file_timeout * (len(remaining) + 4) + 300,
            max_rss_mb=args.max_rss_mb,
            progress=log,
            stall=args.file_timeout + 15,
            startup=max(args.timeout, 120),
        )
        peak = max(peak, result.peak_rss_mb)
        events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        previous_rss, in_flight = None, None
        for event in events:
            if event["event"] == "ready":
                previous_rss = event["maxrss_mb"]
            elif event["event"] == "start":
                in_flight = event["i"]
            elif event["event"] == "done":
                growth = event["maxrss_mb"] - previous_rss if previous_rss is not None else 0.0
                previous_rss = event["maxrss_mb"]
                extra = {"seconds": event["seconds"], "rss_growth_mb": round(growth, 1)}
                verdicts[event["i"]] = Verdict(event["verdict"], event["detail"], extra)
                in_flight = None
        status, detail = result.status((0,))
        if in_flight is not None:  # the worker died or was killed on this file
            outcome = "hung" if status == "hung" else "crashed"
            verdicts[in_flight] = Verdict(outcome, f"worker {detail}", {"seconds": result.seconds})
        elif status != "ok":
            notes.append(f"per-file worker {status} outside any file: {detail}")
            for i in remaining:
                verdicts.setdefault(i, Verdict("unreached", f"worker {status}: {detail}"))
        left = [i for i in remaining if i not in verdicts]
        if len(left) == len(remaining):  # no progress at all: do not loop forever
            for i in left:
                verdicts[i] = Verdict("unreached", f"worker {status}: {detail}")
            left = []
        remaining = left
    return [verdicts[i] for i in range(len(entries))], peak, notes


# ------------------------------------------------------------------------------------------------ batch commands


class PathIndex:
    """Finds the corpus entry a path printed by brainscan names: absolute, relative to the data root, or escaped."""

    def __init__(self, keys: dict[str, int]) -> None:
        self.keys = keys

    @classmethod
    def of(cls, *names: list[str]) -> PathIndex:
        """Entry ``i`` under each of its names ``names[k][i]``, each as brainscan may print it: escaped
        (``\\xff``), with surrogate escapes, or with U+FFFD for bytes that are not UTF-8."""
        keys: dict[str, int] = {}
        for paths in names:
            for i, path in enumerate(paths):
                keys |= {display(path): i, path: i, os.fsencode(path).decode("utf-8", "replace"): i}
        return cls(keys)

    def find(self, text: str) -> int | None:
        if text in self.keys:
            return self.keys[text]
        hits = {i for key, i in self.keys.items() if text.endswith("/" + key) or key.endswith("/" + text)}
        return hits.pop() if len(hits) == 1 else None


def parse_predict(run_: Run, arguments: list[str], n: int) -> tuple[list[Verdict], list[str]]:
    """Each input's verdict from ``predict --json``: its JSON line on stdout (a label, or the error), or a line
    under the skip heading (as ``predict`` listed skipped inputs before it gave them JSON lines)."""
    index = PathIndex.of(arguments)
    verdicts: dict[int, Verdict] = {}
    unmatched: list[str] = []
    for line in run_.stdout.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        i = index.find(str(record.get("path", ""))) if isinstance(record, dict) else None
        if i is None:
            unmatched.append(f"stdout: {line[:200]}")
        elif "error" in record:  # an input that could not be read: its line carries the reason
            verdicts[i] = Verdict("refused", str(record["error"]))
        else:
            verdicts[i] = Verdict("accepted", f"predicted {record.get('label')}")
    lines = run_.stderr.splitlines()
    start = next((k for k, line in enumerate(lines) if SKIP_HEADING in line), None)
    for line in lines[start + 1 :] if start is not None else []:
        if not line.startswith("  "):
            break
        body = line[2:]
        match = [(key, i) for key, i in index.keys.items() if body.startswith(key + ":")]
        if match:
            key, i = max(match, key=lambda m: len(m[0]))
            verdicts[i] = Verdict("refused", body[len(key) + 1 :].strip())
        else:
            unmatched.append(f"stderr: {line[:200]}")
    return [verdicts.get(i, Verdict("missing")) for i in range(n)], unmatched


def read_csv_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8", errors="backslashreplace") as f:
        return list(csv.DictReader(f))


def listed_verdicts(
    n: int, index: PathIndex, refused: list[tuple[str, str]], used: list[str] | None
) -> tuple[list[Verdict], list[str]]:
    """Verdicts from a command's list of refused (path, reason) and, when it has one, its list of used paths."""
    verdicts: dict[int, Verdict] = {}
    unmatched = []
    for path, reason in refused:
        i = index.find(path)
        if i is None:
            unmatched.append(f"{path}: {reason}"[:200])
        else:
            verdicts[i] = Verdict("refused", reason)
    for path in used or []:
        i = index.find(path)
        if i is not None:
            both = i in verdicts
            verdicts[i] = Verdict("wrong", "both used and listed as skipped") if both else Verdict("accepted", "used")
    default = Verdict("missing") if used is not None else Verdict("accepted", "not listed as unreadable")
    return [verdicts.get(i, default) for i in range(n)], unmatched


# ------------------------------------------------------------------------------------------------ judging


def expects(entry: Entry, command: str) -> str:
    """``refuse`` or ``accept``: what ``command`` should do with ``entry``."""
    if entry.expected == "predict-only":
        return "accept" if command in ("per_file", "predict") else "refuse"
    return entry.expected


def judge(entry: Entry, command: str, verdict: Verdict, command_ok: bool) -> tuple[str | None, str]:
    """The outcome of one file under one command (None: the command never got to it), and what went wrong."""
    raw = verdict.outcome
    expected = expects(entry, command)
    if raw in ("crashed", "hung"):
        return raw, verdict.detail
    if raw == "unreached" or (raw == "missing" and not command_ok):
        return None, verdict.detail
    if raw == "missing":
        return "wrong", "not mentioned in the output (neither used nor listed as refused)"
    if raw == "wrong":
        return "wrong", verdict.detail
    if raw == "refused" and not verdict.detail.strip():
        return "wrong", "refused without a reason"
    if expected == "refuse" and raw == "accepted":
        return "wrong", f"accepted ({verdict.detail}) but should be refused"
    if expected == "accept" and raw == "refused":
        return "wrong", f"refused but should be accepted: {verdict.detail}"
    return raw, verdict.detail


def place_training_copy(entries: list[Entry], corpus: Path, folder: Path) -> list[str]:
    """The corpus in ``folder``'s yes/ and no/ (alternately), specials made in place; each file's path there."""
    rels = []
    for k, entry in enumerate(entries):
        rel = f"{('yes', 'no')[k % 2]}/{entry.rel}"
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if entry.special:
            Entry(rel, entry.kind, entry.expected, None, entry.special).create(folder)
        else:
            shutil.copyfile(corpus / entry.rel, target)
        rels.append(rel)
    return rels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="folder for the corpus, runs and logs (kept)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per brainscan command")
    parser.add_argument("--file-timeout", type=int, default=30, help="seconds per file in the per-file pass")
    parser.add_argument("--max-rss-mb", type=float, default=4096, help="kill a child above this resident memory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help="exit 1 when anything crashed, hung or was wrong")
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        checkpoint, files_json, log, timeout = args.worker
        worker(checkpoint, files_json, log, int(timeout))
        return
    if args.work is None:
        with tempfile.TemporaryDirectory(prefix="bench-badinput-") as tmp:
            code = benchmark(Path(tmp), args)
    else:
        code = benchmark(args.work, args)
    sys.exit(code)


def benchmark(work: Path, args: argparse.Namespace) -> int:
    started = time.monotonic()
    sys.stdout.reconfigure(errors="backslashreplace")  # file names that are not UTF-8 print, escaped
    work.mkdir(parents=True, exist_ok=True)
    for name in ("corpus", "good", "train-data", "runs", "audit", "logs"):
        if (work / name).exists():
            shutil.rmtree(work / name)
    corpus, logs = work / "corpus", work / "logs"
    env = os.environ | {"PYTHONUNBUFFERED": "1", "NO_COLOR": "1", "COLUMNS": "400"}

    entries = build_corpus(args.seed)
    paths = [e.create(corpus) for e in entries]
    kinds = list(dict.fromkeys(e.kind for e in entries))
    print(f"corpus: {len(entries)} files in {len(kinds)} kinds under {corpus} ({time.monotonic() - started:.0f} s)")
    write_good(work / "good", args.seed)

    def limits(timeout: float) -> dict:
        return {"timeout": timeout, "max_rss_mb": args.max_rss_mb, "env": env}

    setup = run(
        [*BRAINSCAN, "train", "--data", str(work / "good"), "--out", str(work / "runs" / "ckpt"), *TINY],
        logs,
        "setup-train",
        **limits(max(3 * args.timeout, 300)),
    )
    ckpt = work / "runs" / "ckpt" / "best.pt"
    if setup.status((0,))[0] != "ok" or not ckpt.is_file():
        sys.exit(f"cannot train the checkpoint on good images: {setup.status((0,))[1]}\n{setup.stderr[-2000:]}")
    print(f"checkpoint: {ckpt} ({setup.seconds:.0f} s)")

    raw: dict[str, list[Verdict]] = {}
    command_status: dict[str, tuple[str, str]] = {}
    peaks: dict[str, float] = {}
    unmatched: dict[str, list[str]] = {}

    t = time.monotonic()
    raw["per_file"], peaks["predict_per_file"], notes = per_file_pass(entries, paths, ckpt, logs, args)
    command_status["per_file"] = ("crashed", "; ".join(notes)) if notes else ("ok", "every file reported on")
    print(f"per-file pass: {len(entries)} files ({time.monotonic() - t:.0f} s)")

    arguments = [os.fspath(p) for p in paths]
    batch = run(
        [*BRAINSCAN, "predict", "--checkpoint", str(ckpt), "--json", *arguments],
        logs,
        "predict",
        **limits(args.timeout),
    )
    raw["predict"], unmatched["predict"] = parse_predict(batch, arguments, len(entries))
    command_status["predict"] = batch.status((0, 1))
    peaks["predict"] = batch.peak_rss_mb
    print(f"predict (batch): {command_status['predict'][1]} ({batch.seconds:.0f} s)")

    data = work / "train-data"
    shutil.copytree(work / "good", data)
    rels = place_training_copy(entries, corpus, data)
    index = PathIndex.of(rels, [os.fspath(data / r) for r in rels])
    run_dir = work / "runs" / "train"
    trained = run(
        [*BRAINSCAN, "train", "--data", str(data), "--out", str(run_dir), *TINY], logs, "train", **limits(args.timeout)
    )
    skipped = [(r.get("path", ""), r.get("reason", "")) for r in read_csv_rows(run_dir / "skipped.csv")]
    used = [r.get("path", "") for r in read_csv_rows(run_dir / "split.csv")]
    raw["train"], unmatched["train"] = listed_verdicts(len(entries), index, skipped, used)
    command_status["train"] = trained.status((0,))
    if command_status["train"][0] == "ok" and not (run_dir / "skipped.csv").is_file():
        command_status["train"] = ("failed", "exit 0 but no skipped.csv in the run directory")
    peaks["train"] = trained.peak_rss_mb
    print(f"train: {command_status['train'][1]} ({trained.seconds:.0f} s)")

    audit_dir = work / "audit"
    audited = run(
        [*BRAINSCAN, "audit", "--data", str(data), "--out", str(audit_dir), "-q", "--no-confound-check"],
        logs,
        "audit",
        **limits(args.timeout),
    )
    try:
        report = json.loads((audit_dir / "audit.json").read_text())
        unreadable = [(f.get("path", ""), f.get("reason", "")) for f in report["unreadable"]["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        report, unreadable = None, []
    raw["audit"], unmatched["audit"] = listed_verdicts(len(entries), index, unreadable, None)
    command_status["audit"] = audited.status((0,))
    stderr_of = {"predict": batch, "train": trained, "audit": audited}
    if command_status["audit"][0] == "ok" and report is None:
        command_status["audit"] = ("failed", "exit 0 but no readable audit.json")
    if command_status["audit"][0] != "ok":  # no audit.json: "not listed" means nothing
        raw["audit"] = [Verdict("unreached", command_status["audit"][1]) for _ in entries]
    peaks["audit"] = audited.peak_rss_mb
    print(f"audit: {command_status['audit'][1]} ({audited.seconds:.0f} s)")

    # ---- judge
    outcome: dict[str, list[tuple[str | None, str]]] = {}
    for command in COMMANDS:
        ok = command_status[command][0] == "ok"
        outcome[command] = [judge(e, command, v, ok) for e, v in zip(entries, raw[command], strict=True)]
    overall: list[str | None] = []
    for k in range(len(entries)):
        got = [outcome[c][k][0] for c in COMMANDS if outcome[c][k][0] is not None]
        worst = max(got, key=lambda o: RANK[o], default=None)
        first = outcome["per_file"][k][0]
        overall.append(worst if worst in ("wrong", "crashed", "hung") else first or worst)

    print()
    header = (
        f"{'kind':26s} {'n':>3s} {'expect':>6s} {'refused':>7s} {'accept':>6s} {'crash':>5s} {'hung':>4s} {'wrong':>5s}"
    )
    print(header + "   as expected: " + "  ".join(f"{c:>8s}" for c in COMMANDS))
    for kind in kinds:
        members = [k for k, e in enumerate(entries) if e.kind == kind]
        counts = Counter(overall[k] for k in members)
        expect = entries[members[0]].expected
        right = []
        for command in COMMANDS:
            judged = [(k, outcome[command][k][0]) for k in members if outcome[command][k][0] is not None]
            good = sum(o == ("refused" if expects(entries[k], command) == "refuse" else "accepted") for k, o in judged)
            right.append(f"{good}/{len(judged)}" if judged else "-")
        cells = [counts[o] for o in OUTCOMES]
        row = f"{kind:26s} {len(members):3d} {expect:>6s} " + " ".join(
            f"{c:{w}d}" for c, w in zip(cells, (7, 6, 5, 4, 5), strict=True)
        )
        print(row + "                  " + "  ".join(f"{r:>8s}" for r in right))
    totals = Counter(o for o in overall if o is not None)
    print(
        f"{'total':26s} {len(entries):3d} {'':6s} "
        + " ".join(f"{totals[o]:{w}d}" for o, w in zip(OUTCOMES, (7, 6, 5, 4, 5), strict=True))
    )

    print("\nreasons (per-file pass, first file of each kind):")
    for kind in kinds:
        k = next(k for k, e in enumerate(entries) if e.kind == kind)
        print(f"  {kind:26s} {raw['per_file'][k].outcome:9s} {raw['per_file'][k].detail[:150]}")

    growth = sorted(
        ((raw["per_file"][k].extra.get("rss_growth_mb", 0.0), k) for k in range(len(entries))), reverse=True
    )[:5]
    print("\nper-file pass, largest rises of the worker's peak memory (MB, seconds): " + ", ".join(
        f"{display(entries[k].rel)} +{g:.0f} ({raw['per_file'][k].extra.get('seconds', 0):.1f} s)" for g, k in growth
    ))  # fmt: skip

    print("\ncommands:")
    for command in COMMANDS:
        status, detail = command_status[command]
        print(f"  {command:9s} {status:8s} {detail}")
        warned = warning_lines(stderr_of[command].stderr) if command in stderr_of else []
        if warned:
            print(f"            stderr holds {len(warned)} Python warning(s), e.g. {warned[0][:200]}")
        for line in unmatched.get(command, [])[:10]:
            print(f"            output line matching no corpus file: {line}")

    failures = [
        (entries[k].kind, display(entries[k].rel), command, o, detail)
        for command in COMMANDS
        for k, (o, detail) in enumerate(outcome[command])
        if o in ("crashed", "hung", "wrong")
    ]
    print(f"\nfailures ({len(failures)} file × command):" if failures else "\nfailures: none")
    for kind, name, command, o, detail in sorted(failures):
        print(f"  {o:7s} {command:9s} {kind:24s} {name}: {detail[:300]}")

    by_command = {}
    for command in COMMANDS:
        c = Counter(o for o, _ in outcome[command] if o is not None)
        by_command[command] = {"status": command_status[command][0], **{o: c[o] for o in OUTCOMES}}
    commands_crashed = sum(s == "crashed" or s == "failed" for s, _ in command_status.values())
    commands_hung = sum(s == "hung" for s, _ in command_status.values())
    figures = {
        "files": len(entries),
        "kinds": len(kinds),
        "tried": sum(totals.values()),
        "refused_with_reason": totals["refused"],
        "accepted": totals["accepted"],
        "crashed": totals["crashed"],
        "hung": totals["hung"],
        "wrong_verdict": totals["wrong"],
        "commands_crashed": commands_crashed,
        "commands_hung": commands_hung,
        "by_command": by_command,
        "peak_rss_mb": {k: round(peaks[k], 1) for k in ("predict", "predict_per_file", "train", "audit")},
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(figures))
    bad = totals["crashed"] + totals["hung"] + totals["wrong"] + commands_crashed + commands_hung
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    main()
