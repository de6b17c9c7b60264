"""One reader per file format, each turning a file into a 2-D ``uint8`` grayscale slice.

MRI slices are single-channel; every container (JPEG/PNG in any mode, 16-bit PNG, DICOM, NIfTI) is mapped
to the same representation so that training and prediction see one consistent input.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import BrainscanError


class ImageReadError(BrainscanError):
    """A file that cannot be turned into an image; the message names the file and the reason."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def optional_import(module: str, extra: str) -> ModuleType:
    """Import a format library on use, naming the pip extra that provides it when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BrainscanError(
            f"Reading this format needs {module}: pip install 'brainscan[{extra}]' (or pip install {module})."
        ) from exc


def to_uint8(array: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Linearly map ``[low, high]`` (default: the array's min and max) onto 0..255."""
    array = np.asarray(array, dtype=np.float32)
    low = float(np.min(array)) if low is None else low
    high = float(np.max(array)) if high is None else high
    if not np.isfinite(low) or not np.isfinite(high):
        raise ValueError("image holds non-finite values")
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    scaled = (np.clip(array, low, high) - low) * (255.0 / (high - low))
    return np.rint(scaled).astype(np.uint8)


class ImageReader(ABC):
    """Reads one family of file formats into a 2-D ``uint8`` array."""

    suffixes: tuple[str, ...] = ()

    def verify_suffix(self, path: str | Path) -> bool:
        name = str(path).lower()
        return any(name.endswith(s) for s in self.suffixes)

    def read(self, path: str | Path) -> np.ndarray:
        """Decode ``path``; any failure becomes an :class:`ImageReadError` naming the file."""
        path = Path(path)
        try:
            if path.stat().st_size == 0:
                raise ImageReadError(path, "empty file (0 bytes)")
            return self._read(path)
        except ImageReadError:
            raise
        except BrainscanError:
            raise
        except Exception as exc:  # decoders raise many types; the user needs the file and the reason
            raise ImageReadError(path, f"cannot decode ({type(exc).__name__}: {exc})") from exc

    @abstractmethod
    def _read(self, path: Path) -> np.ndarray: ...


def pil_to_gray(image: Image.Image) -> np.ndarray:
    """Any PIL mode to 2-D uint8: alpha composited on black, palettes expanded, 16/32-bit rescaled."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return to_uint8(np.asarray(image))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, rgba)
    if image.mode != "L":
        image = image.convert("L")
    return np.asarray(image, dtype=np.uint8)


class PILReader(ImageReader):
    """JPEG, PNG, BMP, TIFF through Pillow, which sniffs the real format (PNG data behind ``.jpg`` is fine)."""

    suffixes = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

    def _read(self, path: Path) -> np.ndarray:
        try:
            with Image.open(path) as image:
                image.load()  # decode fully now: truncated data fails here, not mid-epoch
                array = pil_to_gray(image)
        except UnidentifiedImageError as exc:
            raise ImageReadError(path, "not an image Pillow can identify") from exc
        except OSError as exc:
            raise ImageReadError(path, f"truncated or corrupt image data ({exc})") from exc
        return _check_2d(path, array)


class DicomReader(ImageReader):
    """DICOM through pydicom: modality LUT (rescale slope/intercept), then the VOI window when the file has one.

    Multi-frame files give their middle frame; MONOCHROME1 is inverted so that bright means high signal.
    """

    suffixes = (".dcm", ".dicom")

    def _read(self, path: Path) -> np.ndarray:
        pydicom = optional_import("pydicom", "formats")
        try:
            from pydicom.pixels import apply_modality_lut, apply_voi_lut
        except ImportError:  # pydicom < 3
            from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

        ds = pydicom.dcmread(path)
        if "PixelData" not in ds:
            raise ImageReadError(path, "DICOM file has no pixel data")
        pixels = ds.pixel_array
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if frames > 1:
            pixels = pixels[frames // 2]
        if pixels.ndim == 3:  # colour DICOM
            pixels = pixels.mean(axis=-1)
        values = apply_modality_lut(pixels, ds)
        if "WindowCenter" in ds and "WindowWidth" in ds:
            values = apply_voi_lut(values, ds)
        array = to_uint8(values)
        if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
            array = 255 - array
        return _check_2d(path, array)


class NiftiReader(ImageReader):
    """NIfTI through nibabel: the volume is reoriented to RAS and its **middle axial slice** is returned.

    4-D files use their first volume. Intensities are mapped to 0..255 between the slice's 0.5th and 99.5th
    percentiles, so that a few bright voxels do not darken the whole slice.
    """

    suffixes = (".nii", ".nii.gz")

    def _read(self, path: Path) -> np.ndarray:
        nib = optional_import("nibabel", "formats")
        image = nib.as_closest_canonical(nib.load(str(path)))
        volume = np.asarray(image.dataobj, dtype=np.float32)
        while volume.ndim > 3:
            volume = volume[..., 0]
        if volume.ndim == 3:
            volume = volume[:, :, volume.shape[2] // 2]
        # RAS voxel axes are (right, anterior); rotate so anterior is up, as radiologists view an axial slice.
        slice_ = np.rot90(volume)
        low, high = np.percentile(slice_, [0.5, 99.5])
        return _check_2d(path, to_uint8(slice_, float(low), float(high)))


def _check_2d(path: Path, array: np.ndarray) -> np.ndarray:
    if array.ndim != 2 or min(array.shape) < 8:
        raise ImageReadError(path, f"unusable image shape {array.shape}")
    return np.ascontiguousarray(array)


READERS: tuple[ImageReader, ...] = (PILReader(), DicomReader(), NiftiReader())


def reader_for(path: str | Path) -> ImageReader | None:
    """The reader whose suffixes match ``path``, or None for files brainscan does not read."""
    return next((r for r in READERS if r.verify_suffix(path)), None)


def is_supported(path: str | Path) -> bool:
    return reader_for(path) is not None


def read_image(path: str | Path) -> np.ndarray:
    """Read any supported file into a 2-D ``uint8`` grayscale array.

    Raises:
        ImageReadError: the file is missing, unsupported, empty, truncated or not an image.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "no such file")
    reader = reader_for(path)
    if reader is None:
        raise ImageReadError(path, f"unsupported file type {''.join(path.suffixes) or '(no suffix)'}")
    return reader.read(path)
