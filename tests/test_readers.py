"""Every container and mode the datasets hold becomes one 2-D uint8 slice; bad files fail with file and reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brainscan.data.readers import ImageReadError, read_image


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
