"""Every container and mode the datasets hold becomes one 2-D uint8 slice; bad files fail with file and reason."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from brainscan.data.readers import READERS, ImageReadError, read_image, to_uint8


def _gradient(size: int = 32) -> np.ndarray:
    return np.tile(np.linspace(0, 255, size, dtype=np.uint8), (size, 1))


@pytest.mark.parametrize(
    "mode",
    [pytest.param(m, id=m) for m in ("L", "RGB", "RGBA", "P", "LA", "I;16", "I", "1", "CMYK")],
)
def test_every_pil_mode_reads_as_2d_uint8(tmp_path: Path, mode: str) -> None:
    base = Image.fromarray(_gradient())
    if mode == "I;16":
        image = Image.fromarray(_gradient().astype(np.uint16) * 257)
    elif mode == "I":
        image = Image.fromarray(_gradient().astype(np.int32) * 1000)
    else:
        image = base.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I") else "x.png")
    image.save(path)
    out = read_image(path)
    assert out.dtype == np.uint8 and out.shape == (32, 32)
    assert out[:, -1].mean() > out[:, 0].mean()  # the gradient survives the conversion


def test_sixteen_bit_png_uses_the_full_8_bit_range(tmp_path: Path) -> None:
    array = np.linspace(1000, 3000, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(array).save(tmp_path / "deep.png")
    out = read_image(tmp_path / "deep.png")
    assert out.min() == 0 and out.max() == 255


def test_rgba_transparency_becomes_black_background(tmp_path: Path) -> None:
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[4:12, 4:12, 3] = 255  # opaque white square on transparent white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out[0, 0] == 0 and out[8, 8] == 255


@pytest.mark.parametrize("name", ["scan.jpg", "scan.JPG", "scan.jpeg"])
def test_png_data_behind_a_jpeg_name_is_read(tmp_path: Path, name: str) -> None:
    Image.fromarray(_gradient()).save(tmp_path / name, format="PNG")
    assert read_image(tmp_path / name).shape == (32, 32)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        pytest.param(b"", "empty file", id="zero-byte"),
        pytest.param(b"this is not an image", "not an image", id="text-named-jpg"),
    ],
)
def test_bad_files_name_the_file_and_the_reason(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_truncated_jpeg_is_an_error_not_a_partial_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(tmp_path / "full.jpg", quality=95)
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match="truncated"):
        read_image(tmp_path / "cut.jpg")


def test_unsupported_suffix_and_missing_file_are_errors(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageReadError, match="unsupported file type"):
        read_image(tmp_path / "notes.txt")
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "absent.png")


def test_dicom_encodings_of_one_slice_decode_to_the_same_pixels() -> None:
    pydicom_data = pytest.importorskip("pydicom.data")
    names = ["MR_small.dcm", "MR_small_RLE.dcm", "MR_small_bigendian.dcm", "MR_small_implicit.dcm"]
    slices = [read_image(pydicom_data.get_testdata_file(n)) for n in names]
    assert slices[0].shape == (64, 64) and slices[0].std() > 10
    for other in slices[1:]:
        np.testing.assert_array_equal(slices[0], other)


def test_dicom_applies_rescale_and_window(tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 100, 20  # a narrow window: most of the slice saturates
    ds.save_as(tmp_path / "windowed.dcm")
    windowed = read_image(tmp_path / "windowed.dcm")
    plain = read_image(get_testdata_file("MR_small.dcm"))
    assert ((windowed == 0) | (windowed == 255)).mean() > ((plain == 0) | (plain == 255)).mean()


def test_truncated_dicom_is_an_error() -> None:
    pydicom_data = pytest.importorskip("pydicom.data")
    with pytest.raises(ImageReadError, match="MR_truncated"):
        read_image(pydicom_data.get_testdata_file("MR_truncated.dcm"))


def test_nifti_volume_gives_its_middle_axial_slice(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    volume = np.zeros((20, 24, 9), np.int16)
    volume[:, :, 4] = 1000  # only the middle slice is bright
    volume[5:10, 5:10, 4] = 2000
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "vol.nii.gz")
    out = read_image(tmp_path / "vol.nii.gz")
    assert out.shape == (24, 20)  # rotated so anterior is up
    assert out.max() == 255 and out.min() < 255


def test_real_nifti_from_nibabel_reads() -> None:
    nib_tests = pytest.importorskip("nibabel.tests")
    path = Path(nib_tests.__file__).parent / "data" / "anatomical.nii"
    out = read_image(path)
    assert out.ndim == 2 and out.std() > 5


# --- paths that are not regular files --------------------------------------------------------------------------------

# Runs a snippet in a fresh interpreter that imports brainscan's data modules without the package's __init__ (which
# imports torch): a second, not ten, to start. Used where a regression would hang or exhaust memory, so that the test
# fails instead of taking the suite down with it.
_FRESH_READERS = """
import importlib.util, sys, types
package = types.ModuleType("brainscan")
package.__path__ = list(importlib.util.find_spec("brainscan").submodule_search_locations)
sys.modules["brainscan"] = package
"""


def _run_fresh(code: str, *, timeout: float, whole_package: bool = False) -> str:
    """Run ``code`` in a new interpreter (killed after ``timeout`` s); its stdout, or fail with its stderr."""
    script = code if whole_package else _FRESH_READERS + code
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"did not finish within {timeout} s (hung?)")
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.fixture
def not_regular_files(tmp_path: Path) -> list[Path]:
    """A FIFO and a symlink to /dev/zero, named as images: opening the first blocks, reading the second never ends."""
    if not hasattr(os, "mkfifo") or not Path("/dev/zero").exists():
        pytest.skip("needs POSIX FIFOs and /dev/zero")
    fifo, zero = tmp_path / "fifo.png", tmp_path / "zero.jpg"
    os.mkfifo(fifo)
    zero.symlink_to("/dev/zero")
    return [fifo, zero]


def test_fifos_and_devices_are_refused_by_every_reader_without_being_opened(not_regular_files: list[Path]) -> None:
    reads = {"read_image": read_image, **{type(reader).__name__: reader.read for reader in READERS}}
    results: dict[str, str] = {}

    def read_all() -> None:
        for path in not_regular_files:
            for name, read in reads.items():
                try:
                    read(path)
                except ImageReadError as exc:
                    results[f"{path.name} {name}"] = exc.reason

    worker = threading.Thread(target=read_all, daemon=True)  # a daemon: a hang fails the test, not the suite
    worker.start()
    worker.join(timeout=30)
    assert not worker.is_alive(), "reading a FIFO or a device hung"
    assert len(results) == 2 * len(reads)
    for key, reason in results.items():
        assert reason.startswith("not a regular file ("), key
    assert "FIFO" in results["fifo.png read_image"] and "character device" in results["zero.jpg read_image"]


def test_fifos_and_devices_listed_as_images_are_skipped_promptly_by_ingest_audit_and_confounding(
    tmp_path: Path, not_regular_files: list[Path]
) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(_gradient()).save(good)
    paths = [str(p) for p in [*not_regular_files, good]]
    # SIGALRM after the imports: a regression ends the child in 60 s (its default action) rather than hanging.
    out = _run_fresh(
        f"""
import json, signal
from brainscan.data.confounding import file_features
from brainscan.data.duplicates import fingerprint_files
from brainscan.data.ingest import load_images
from brainscan.data.readers import ImageReadError
from brainscan.data.transforms import SliceFormat
signal.alarm(60)
paths = {paths!r}
table = load_images(paths, SliceFormat(16))
audit = fingerprint_files(paths)
features = []
for path in paths:
    try:
        file_features(path)
        features.append(None)
    except ImageReadError as exc:
        features.append(exc.reason)
print(json.dumps({{"kept": table.kept, "skipped": table.skipped, "audit": [a if isinstance(a, str) else None
                  for a in audit], "features": features}}))
""",
        timeout=240,
        whole_package=True,
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["kept"] == [2]
    assert [path for path, _ in result["skipped"]] == paths[:2]
    for reasons in ([reason for _, reason in result["skipped"]], result["audit"][:2], result["features"][:2]):
        assert all(reason.startswith("not a regular file (") for reason in reasons), reasons
    assert result["audit"][2] is None and result["features"][2] is None


# --- sizes declared in headers ----------------------------------------------------------------------------------------


def _write_huge_zero_volume(path: Path, n: int = 1024) -> None:
    """An n³ int16 .nii.gz (2 GiB of voxels for n = 1024) in about 2 MB, written without ever holding the volume.

    The data is zeros but for a bright square in the middle axial slice. gzip members may be concatenated, so one
    compressed 64 MiB run of zeros is written over and over.
    """
    nib = pytest.importorskip("nibabel")
    header = nib.Nifti1Header()
    header.set_data_shape((n, n, n))
    header.set_data_dtype(np.int16)
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    header["vox_offset"] = 352
    plane = np.zeros((n, n), np.int16)
    plane[n // 4 : n // 2, n // 4 : 3 * n // 4] = 1000
    run = 64 << 20
    zeros = gzip.compress(bytes(run), compresslevel=9, mtime=0)

    def write_zeros(f: Any, count: int) -> None:
        f.write(zeros * (count // run))
        if count % run:
            f.write(gzip.compress(bytes(count % run), mtime=0))

    with open(path, "wb") as f:
        f.write(gzip.compress(header.binaryblock + bytes(4), mtime=0))  # 348-byte header + empty extension flag
        write_zeros(f, (n // 2) * plane.nbytes)
        f.write(gzip.compress(plane.tobytes(order="F"), mtime=0))
        write_zeros(f, (n - n // 2 - 1) * plane.nbytes)


@pytest.mark.skipif(sys.platform != "linux", reason="reads the child's memory from /proc and ru_maxrss (Linux units)")
def test_huge_nifti_volume_is_read_one_slice_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "huge.nii.gz"
    _write_huge_zero_volume(path)
    assert path.stat().st_size < 4_000_000
    # The child may grow by 1 GiB of address space at most: reading the whole volume (the old way: 2 GiB of int16,
    # then 4 GiB of float32) fails there at once, instead of taking 7 GB of the machine's memory.
    out = _run_fresh(
        f"""
import json, resource
import nibabel
from brainscan.data.readers import read_image
size = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + (1 << 30), resource.RLIM_INFINITY))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = read_image({str(path)!r})
grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # ru_maxrss: KiB on Linux
print(json.dumps({{"shape": out.shape, "dtype": str(out.dtype), "bright": int((out == 255).sum()), "mb": grown_mb}}))
""",
        timeout=180,
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["shape"] == [1024, 1024] and result["dtype"] == "uint8"
    assert result["bright"] == 256 * 512  # the middle slice's square, nothing else
    assert result["mb"] < 100, f"reading one slice grew the process by {result['mb']:.0f} MB"


def _canonical_middle_slice(path: Path) -> np.ndarray:
    """What NiftiReader returned before it read single slices: the whole volume, as_closest_canonical, sliced."""
    nib = pytest.importorskip("nibabel")
    volume = np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj, dtype=np.float32)
    while volume.ndim > 3:
        volume = volume[..., 0]
    slice_ = np.rot90(volume[:, :, volume.shape[2] // 2])
    low, high = np.percentile(slice_, [0.5, 99.5])
    return to_uint8(slice_, float(low), float(high))


def _oblique(matrix: list[list[float]], degrees: float = 20.0) -> np.ndarray:
    turn = np.radians(degrees)
    rotation = np.array([[np.cos(turn), -np.sin(turn), 0], [np.sin(turn), np.cos(turn), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.array(matrix, dtype=float)
    return affine


@pytest.mark.parametrize(
    ("affine", "shape"),
    [
        pytest.param(np.diag([-1.0, -1.0, 1.0, 1.0]), (12, 14, 10), id="LPS"),
        pytest.param(np.diag([1.0, 1.0, -2.0, 1.0]), (12, 14, 10), id="RAI-even-depth"),
        pytest.param(np.diag([1.0, 1.0, -2.0, 1.0]), (12, 14, 9), id="RAI-odd-depth"),
        pytest.param(_oblique([[0, 0, 1], [1, 0, 0], [0, 1, 0]]), (10, 12, 14), id="axes-ASR-oblique"),
        pytest.param(_oblique([[0, -1, 0], [0, 0, -1], [-1, 0, 0]]), (10, 12, 14), id="axes-ILP-oblique"),
        pytest.param(_oblique([[0, 0, -1.5], [0, -0.9, 0], [1.2, 0, 0]]), (9, 12, 14, 3), id="axes-SPL-4d"),
    ],
)
def test_non_canonical_nifti_gives_the_middle_slice_of_its_closest_canonical_volume(
    tmp_path: Path, affine: np.ndarray, shape: tuple[int, ...]
) -> None:
    nib = pytest.importorskip("nibabel")
    volume = np.random.default_rng(1).integers(0, 4000, shape).astype(np.int16)
    for name in ("vol.nii", "vol.nii.gz"):
        nib.save(nib.Nifti1Image(volume, affine), tmp_path / name)
        np.testing.assert_array_equal(read_image(tmp_path / name), _canonical_middle_slice(tmp_path / name))


def test_nifti_slice_above_the_pixel_limit_is_refused_from_its_header(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    header = nib.Nifti1Header()
    header.set_data_shape((30_000, 30_000, 2))
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 352
    (tmp_path / "wide.nii.gz").write_bytes(gzip.compress(header.binaryblock + bytes(4 + 1000)))
    with pytest.raises(ImageReadError, match=r"30000 × 30000 slice has 900,000,000 pixels, above the limit of"):
        read_image(tmp_path / "wide.nii.gz")


def test_uncompressed_nifti_declaring_more_data_than_the_file_holds_is_refused(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    nib.save(nib.Nifti1Image(np.ones((16, 16, 8), np.int16), np.eye(4)), tmp_path / "vol.nii")
    data = (tmp_path / "vol.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[: len(data) - 100])
    with pytest.raises(ImageReadError, match=r"declares 4,448 bytes .* but the file has 4,348: truncated"):
        read_image(tmp_path / "cut.nii")


def _dicom(rows: int, columns: int, pixel_bytes: bytes, **elements: Any) -> Any:
    """A minimal MR DICOM dataset (explicit VR little endian, 16-bit unsigned unless ``elements`` say otherwise)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if elements.pop("float_pixels", False):
        del ds.BitsStored, ds.HighBit, ds.PixelRepresentation
        ds.BitsAllocated = 32
        ds.FloatPixelData = pixel_bytes
    else:
        ds.PixelData = pixel_bytes
    for key, value in elements.items():
        setattr(ds, key, value)
    return ds


def test_dicom_frame_above_the_pixel_limit_is_refused_from_its_header(tmp_path: Path) -> None:
    _dicom(40_000, 40_000, bytes(64)).save_as(tmp_path / "huge.dcm", enforce_file_format=True)
    with pytest.raises(ImageReadError, match=r"40000 × 40000 frame has 1,600,000,000 pixels, above the limit of"):
        read_image(tmp_path / "huge.dcm")


def test_multiframe_dicom_gives_its_middle_frame(tmp_path: Path) -> None:
    frames = np.stack([np.full((16, 16), 100 * k, np.uint16) for k in range(5)])
    frames[:, :, 8:] += 50  # each frame: two halves, 50 apart
    frames[2, :, 8:] += 1000  # the middle frame's right half is far brighter
    _dicom(16, 16, frames.tobytes(), NumberOfFrames=5).save_as(tmp_path / "multi.dcm", enforce_file_format=True)
    out = read_image(tmp_path / "multi.dcm")
    assert (out[:, :8] == 0).all() and (out[:, 8:] == 255).all()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("side", [pytest.param(10_000, id="100-megapixels"), pytest.param(20_000, id="400-megapixels")])
def test_png_header_above_the_pixel_limit_is_refused_before_decoding(tmp_path: Path, side: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    # 8-bit grey, side × side, with the first rows of data only: Pillow warns (100 MP) or refuses (400 MP) on open
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(bytes((side + 1) * 4))
    (tmp_path / "big.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat))
    with pytest.raises(ImageReadError, match=r"pixels.*limit|limit.*pixels") as info:
        read_image(tmp_path / "big.png")
    assert f"{side * side:,} pixels" in info.value.reason or f"({side * side} pixels)" in info.value.reason


# --- non-finite values -----------------------------------------------------------------------------------------------


def test_nan_and_inf_nifti_voxels_are_background(tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    volume = np.random.default_rng(2).uniform(10, 500, (16, 16, 5)).astype(np.float32)
    clean = volume.copy()
    volume[:4, :4, 2], volume[10, 3, 2], volume[5, 12, 2] = np.nan, np.inf, -np.inf
    clean[:4, :4, 2] = clean[10, 3, 2] = clean[5, 12, 2] = volume[..., 2][np.isfinite(volume[..., 2])].min()
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "nan.nii.gz")
    nib.save(nib.Nifti1Image(clean, np.eye(4)), tmp_path / "clean.nii.gz")
    np.testing.assert_array_equal(read_image(tmp_path / "nan.nii.gz"), read_image(tmp_path / "clean.nii.gz"))


def test_nan_and_inf_float_dicom_pixels_are_background(tmp_path: Path) -> None:
    pixels = np.linspace(-3, 5, 16 * 16, dtype=np.float32).reshape(16, 16)
    pixels[:3, :3], pixels[8, 8], pixels[9, 9] = np.nan, np.inf, -np.inf
    _dicom(16, 16, pixels.tobytes(), float_pixels=True).save_as(tmp_path / "float.dcm", enforce_file_format=True)
    out = read_image(tmp_path / "float.dcm")
    assert (out[:3, :3] == 0).all() and out[8, 8] == out[9, 9] == 0
    assert out[-1, -1] == 255 and out[4, 4] > 0


@pytest.mark.parametrize("suffix", [".nii.gz", ".dcm"])
def test_a_slice_without_finite_values_is_refused_in_words(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"nan{suffix}"
    if suffix == ".dcm":
        nan = np.full((16, 16), np.nan, np.float32).tobytes()
        _dicom(16, 16, nan, float_pixels=True).save_as(path, enforce_file_format=True)
    else:
        nib = pytest.importorskip("nibabel")
        nib.save(nib.Nifti1Image(np.full((16, 16, 3), np.nan, np.float32), np.eye(4)), path)
    with pytest.raises(ImageReadError, match="no finite pixel values"):
        read_image(path)


# --- compressed DICOM ------------------------------------------------------------------------------------------------


def test_jpeg_ls_dicom_decodes_to_the_uncompressed_pixels() -> None:
    pydicom_data = pytest.importorskip("pydicom.data")
    pytest.importorskip("libjpeg", reason="needs pylibjpeg-libjpeg (brainscan[formats])")
    compressed = read_image(pydicom_data.get_testdata_file("MR_small_jpeg_ls_lossless.dcm"))
    np.testing.assert_array_equal(compressed, read_image(pydicom_data.get_testdata_file("MR_small.dcm")))


def test_compressed_dicom_without_a_decoder_names_the_syntax_and_what_to_install() -> None:
    pydicom_data = pytest.importorskip("pydicom.data")
    path = pydicom_data.get_testdata_file("MR_small_jpeg_ls_lossless.dcm")
    # A fresh interpreter in which the JPEG-LS decoders cannot be imported, as on a machine without them.
    out = _run_fresh(
        f"""
for name in ("pylibjpeg", "libjpeg", "openjpeg", "gdcm", "jpeg_ls", "pyjpegls"):
    sys.modules[name] = None
from brainscan.data.readers import ImageReadError, read_image
try:
    read_image({path!r})
except ImageReadError as exc:
    print(exc.reason)
""",
        timeout=120,
    )
    assert "JPEG-LS Lossless" in out and "pip install pylibjpeg pylibjpeg-libjpeg" in out, out


# --- the decoded-slice cache -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "entry",
    [
        pytest.param(np.zeros((10, 10), np.uint8), id="other-shape"),
        pytest.param(np.zeros((16, 16), np.float64), id="other-dtype"),
        pytest.param(np.zeros((2, 16, 16), np.uint8), id="stack"),
    ],
)
def test_a_cache_entry_of_the_wrong_shape_or_type_is_a_miss_and_rebuilt(tmp_path: Path, entry: np.ndarray) -> None:
    from brainscan.data.ingest import load_images
    from brainscan.data.transforms import SliceFormat

    images = [tmp_path / "a.png", tmp_path / "b.png"]
    Image.fromarray(_gradient(40)).save(images[0])
    Image.fromarray(_gradient(40).T.copy()).save(images[1])
    cache = tmp_path / "cache"
    first = load_images(images, SliceFormat(16), cache_dir=cache)
    stale = next(cache.glob("*.npy"))
    np.save(stale, entry)
    again = load_images(images, SliceFormat(16), cache_dir=cache)
    assert again.skipped == []
    np.testing.assert_array_equal(again.images, first.images)
    rebuilt = np.load(stale)
    assert rebuilt.shape == (16, 16) and rebuilt.dtype == np.uint8


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.fromarray(np.tile(np.arange(48, dtype=np.uint8) * 5, (32, 1)))  # 32 rows × 48 columns, dark left
    exif = image.getexif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    out = read_image(tmp_path / "rotated.jpg")
    assert out.shape == (48, 32) and out[0].mean() < out[-1].mean()  # the dark side is now on top
