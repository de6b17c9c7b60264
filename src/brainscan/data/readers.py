"""One reader per file format, each turning a file into a 2-D ``uint8`` grayscale slice.

MRI slices are single-channel; every container (JPEG/PNG in any mode, 16-bit PNG, DICOM, NIfTI) is mapped
to the same representation so that training and prediction see one consistent input.

Every reader checks what it can before decoding: the path must be a regular file (a FIFO or a device such as
``/dev/zero`` could block or never end), and a slice's size, read from the file's header, must be within
:data:`MAX_SIDE` and :func:`max_pixels`, so that a small corrupt or hostile file cannot make the reader allocate
gigabytes. DICOM and NIfTI readers decode one frame or slice, never a whole series or volume.
"""

from __future__ import annotations

import importlib
import math
import os
import stat
import zlib
from abc import ABC, abstractmethod
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from ..errors import BrainscanError

MAX_SIDE = 65_535
"""No slice side may be longer, in pixels: a header declaring more is corrupt (the most a JPEG or DICOM can hold)."""

MULTIFRAME_BYTE_CAP = 1 << 30
"""With pydicom < 3, which decodes every frame at once, multi-frame DICOM pixel data above this many bytes is refused
(pydicom >= 3 decodes the middle frame alone)."""

DICOM_DECODERS_HINT = (
    "pip install 'brainscan[formats]' (or pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg, or python-gdcm)"
)

_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


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


def require_regular_file(path: str | Path) -> os.stat_result:
    """``os.stat`` of ``path`` (following links), refusing anything but a regular file before it is opened.

    Raises:
        ImageReadError: ``path`` is missing, or a FIFO, device, socket or folder (reading those can block forever).
    """
    try:
        info = os.stat(path)
    except FileNotFoundError as exc:
        raise ImageReadError(path, "no such file") from exc
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ImageReadError(path, f"cannot read file ({getattr(exc, 'strerror', None) or exc})") from exc
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for is_kind, name in _FILE_KINDS if is_kind(info.st_mode)), "not a file")
        raise ImageReadError(path, f"not a regular file ({kind}); only ordinary files are read")
    return info


MAX_SLICE_PIXELS = 1 << 24
"""The most pixels one slice may have (4096 × 4096, sixty times a 512 × 512 MRI slice): decoding one, with its
float copies for rescaling and windowing, stays within a few hundred MB; at Pillow's own limit (89 megapixels) a
DICOM frame took over 2 GB. Raise it (``brainscan.data.readers.MAX_SLICE_PIXELS``) only for files you trust."""


def max_pixels() -> int | None:
    """The most pixels one slice may have: :data:`MAX_SLICE_PIXELS`, or Pillow's decompression-bomb limit
    ``PIL.Image.MAX_IMAGE_PIXELS`` where that is lower (None there: no Pillow limit). Read at each call."""
    pillow = Image.MAX_IMAGE_PIXELS
    return MAX_SLICE_PIXELS if pillow is None else min(MAX_SLICE_PIXELS, pillow)


def check_slice_size(path: str | Path, shape: tuple[int, ...], what: str = "slice") -> None:
    """Refuse a slice whose size, as its header declares it, is absurd or above :func:`max_pixels`.

    Called before decoding, so that the refusal costs nothing.
    """
    dims = " × ".join(str(side) for side in shape)
    if any(side > MAX_SIDE for side in shape):
        raise ImageReadError(path, f"the header declares a {dims} {what}; no side may exceed {MAX_SIDE} (corrupt?)")
    cap = max_pixels()
    pixels = math.prod(shape)
    if cap is not None and pixels > cap:
        raise ImageReadError(
            path,
            f"the {dims} {what} has {pixels:,} pixels, above the limit of {cap:,} "
            "(brainscan.data.readers.MAX_SLICE_PIXELS; raise it only for files you trust)",
        )


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


def finite_or_background(path: str | Path, array: np.ndarray) -> np.ndarray:
    """``array`` with NaN and ±Inf pixels set to its lowest finite value, as background (converters write NaN
    outside the field of view or the brain mask).

    Raises:
        ImageReadError: no pixel is finite.
    """
    finite = np.isfinite(array)
    if finite.all():
        return array
    if not finite.any():
        raise ImageReadError(path, "no finite pixel values (every pixel is NaN or infinite)")
    return np.where(finite, array, array[finite].min())


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
            if require_regular_file(path).st_size == 0:
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
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:  # else exif_transpose copies: twice the memory
        image = ImageOps.exif_transpose(image)
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


def open_pil(path: str | Path) -> Image.Image:
    """``PIL.Image.open`` for a regular file whose header declares a size within :func:`check_slice_size`.

    Nothing is decoded yet. Pillow only warns (``DecompressionBombWarning``) between one and two times its limit;
    here that is refused too, without touching the process's warning filters (readers run in threads).

    Raises:
        ImageReadError: not a regular file, or too large; Pillow's own errors for files it cannot identify.
    """
    require_regular_file(path)
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as exc:
        raise ImageReadError(path, f"refused as a decompression bomb: {exc}") from exc
    try:
        check_slice_size(path, (image.height, image.width), "image")
    except ImageReadError:
        image.close()
        raise
    return image


class PILReader(ImageReader):
    """JPEG, PNG, BMP, TIFF through Pillow, which sniffs the real format (PNG data behind ``.jpg`` is fine)."""

    suffixes = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")

    def _read(self, path: Path) -> np.ndarray:
        try:
            with open_pil(path) as image:
                image.load()  # decode fully now: truncated data fails here, not mid-epoch
                array = pil_to_gray(image)
        except UnidentifiedImageError as exc:
            raise ImageReadError(path, "not an image Pillow can identify") from exc
        except OSError as exc:
            raise ImageReadError(path, f"truncated or corrupt image data ({exc})") from exc
        return _check_2d(path, array)


class DicomReader(ImageReader):
    """DICOM through pydicom: modality LUT (rescale slope/intercept), then the VOI window when the file has one.

    The header is read first and the frame's size checked (:func:`check_slice_size`) before any pixel is decoded.
    Multi-frame files give their middle frame, decoded alone (pydicom >= 3); MONOCHROME1 is inverted so that bright
    means high signal; NaN and infinite pixels (float pixel data) become background.
    """

    suffixes = (".dcm", ".dicom")

    def _read(self, path: Path) -> np.ndarray:
        pydicom = optional_import("pydicom", "formats")
        try:
            from pydicom.pixels import apply_modality_lut, apply_voi_lut
        except ImportError:  # pydicom < 3
            from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut

        try:  # values over 64 KiB (the pixel data) are read from the file only when used, after the header checks
            ds = pydicom.dcmread(path, defer_size=1 << 16)
        except pydicom.errors.InvalidDicomError as exc:
            raise ImageReadError(path, "not a DICOM file (no 'DICM' marker after the 128-byte preamble)") from exc
        pixels = finite_or_background(path, _middle_frame(path, ds))
        values = apply_modality_lut(pixels, ds)
        if "WindowCenter" in ds and "WindowWidth" in ds:
            values = apply_voi_lut(values, ds)
        array = to_uint8(values)
        if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
            array = 255 - array
        return _check_2d(path, array)


def _check_declared_length(path: Path, ds: Any) -> None:
    """Pixel data whose header declares more bytes than the file holds is corrupt; reading it would allocate the
    declared size first (gigabytes, from a mutated length field) before finding the file short."""
    size = os.stat(path).st_size
    for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if key in ds:
            length = getattr(ds.get_item(key), "length", None)
            if isinstance(length, int) and length != 0xFFFFFFFF and length > size:
                raise ImageReadError(
                    path, f"the header declares {length:,} bytes of pixel data but the file has {size:,}: truncated?"
                )


def _middle_frame(path: Path, ds: Any) -> np.ndarray:
    """The middle frame of a DICOM dataset's pixel data (grey: colour samples averaged), checked before decoding."""
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ImageReadError(path, "DICOM file has no pixel data")
    rows, columns = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if rows < 1 or columns < 1:
        raise ImageReadError(path, f"DICOM header declares no image size (Rows {rows}, Columns {columns})")
    check_slice_size(path, (rows, columns), "frame")
    samples, bits = int(ds.get("SamplesPerPixel") or 1), int(ds.get("BitsAllocated") or 0)
    if samples not in (1, 3) or bits not in (1, 8, 16, 32, 64):
        raise ImageReadError(path, f"unsupported DICOM pixel layout ({samples} samples of {bits} bits allocated)")
    frames = max(1, int(ds.get("NumberOfFrames") or 1))
    _check_declared_length(path, ds)
    syntax = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    try:
        from pydicom.pixels import get_decoder, pixel_array
    except ImportError:  # pydicom < 3, which decodes every frame at once
        frame_bytes = rows * columns * samples * max(1, bits // 8)
        if frames > 1 and frames * frame_bytes > MULTIFRAME_BYTE_CAP:
            raise ImageReadError(
                path,
                f"{frames} frames of {rows} × {columns} ({frames * frame_bytes:,} bytes) exceed the "
                f"{MULTIFRAME_BYTE_CAP:,}-byte cap of pydicom < 3, which decodes every frame: pip install 'pydicom>=3'",
            ) from None
        get_decoder = pixel_array = None
    if pixel_array is None:
        pixels = ds.pixel_array
        pixels = pixels[frames // 2] if frames > 1 else pixels
        return pixels.mean(axis=-1) if pixels.ndim == 3 else pixels
    if syntax is not None:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError as exc:
            raise ImageReadError(path, f"pydicom cannot decode the {syntax.name} transfer syntax") from exc
        if not decoder.is_available:
            raise ImageReadError(
                path,
                f"DICOM pixel data is compressed as {syntax.name} and no decoder for it is installed: "
                + DICOM_DECODERS_HINT,
            )
    try:  # only this frame is decoded; from the dataset, not the path, which pydicom cannot read when deflated
        pixels = pixel_array(ds, index=frames // 2)
    except RuntimeError as exc:  # pydicom: every installed decoder failed
        first, *plugins = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
        detail = " ".join([first, "; ".join(plugins)]).strip()
        raise ImageReadError(path, f"cannot decode its {getattr(syntax, 'name', '')} pixel data: {detail}") from exc
    return pixels.mean(axis=-1) if pixels.ndim == 3 else pixels  # colour: the mean of the samples


class NiftiReader(ImageReader):
    """NIfTI through nibabel: the **middle axial slice** of the volume reoriented to RAS, anterior up.

    Only that slice is read from the file (of the first volume, for 4-D and higher): the header's affine tells
    which voxel axis runs superior–inferior (``nibabel.orientations.io_orientation``, as ``as_closest_canonical``
    does), and the lazy array proxy reads that one plane, so a huge volume costs one slice of memory. The pixels are
    exactly those of the middle slice of ``as_closest_canonical(image)``. NaN and infinite voxels become background;
    intensities are mapped to 0..255 between the slice's 0.5th and 99.5th percentiles, so that a few bright voxels
    do not darken the whole slice.
    """

    suffixes = (".nii", ".nii.gz")

    def _read(self, path: Path) -> np.ndarray:
        nib = optional_import("nibabel", "formats")
        try:
            image = nib.load(str(path))
        except nib.filebasedimages.ImageFileError as exc:
            raise ImageReadError(path, "not a NIfTI file (nibabel does not recognise its header)") from exc
        except nib.spatialimages.HeaderDataError as exc:
            raise ImageReadError(path, f"invalid NIfTI header ({exc})") from exc
        except (OSError, EOFError, zlib.error) as exc:
            raise ImageReadError(path, f"truncated or corrupt file ({exc})") from exc
        shape = tuple(int(n) for n in image.shape)
        if not shape or min(shape) < 1:
            raise ImageReadError(path, f"the NIfTI header declares an empty image (shape {shape})")
        if max(shape[:3]) > MAX_SIDE:  # (later axes only number volumes: one is read)
            raise ImageReadError(path, f"the NIfTI header declares shape {shape}; no side may exceed {MAX_SIDE}")
        if not path.name.lower().endswith(".gz"):
            declared = image.dataobj.offset + math.prod(shape) * image.get_data_dtype().itemsize
            size = path.stat().st_size
            if declared > size:
                raise ImageReadError(
                    path,
                    f"the header declares {declared:,} bytes (shape {shape}) but the file has {size:,}: truncated?",
                )
        affine = np.asarray(image.affine, dtype=np.float64)
        if not np.isfinite(affine).all():
            raise ImageReadError(path, "the NIfTI header's affine holds non-finite values")
        orientation = nib.orientations.io_orientation(affine)
        if np.isnan(orientation).any():
            raise ImageReadError(path, "the NIfTI header's affine is degenerate: its axes' directions are unknown")
        # orientation[k] = (RAS axis that voxel axis k runs along, +1 or -1); RAS axis 2 is superior–inferior.
        axis_of = {int(ras): k for k, ras in enumerate(orientation[:, 0])}
        flip = orientation[:, 1]
        spatial = (shape + (1, 1))[:3]
        s, r, a = axis_of[2], axis_of[0], axis_of[1]
        middle = spatial[s] // 2  # of the canonical (flipped) axis, as as_closest_canonical's middle slice
        index: list[int | slice] = [slice(None)] * 3
        index[s] = middle if flip[s] > 0 else spatial[s] - 1 - middle
        check_slice_size(path, shape if len(shape) < 3 else (spatial[r], spatial[a]))
        try:
            if len(shape) < 3:  # a 2-D image: it is its own slice
                plane = np.asarray(image.dataobj, dtype=np.float32).reshape(spatial)[tuple(index)]
            else:
                plane = np.asarray(image.dataobj[tuple(index) + (0,) * (len(shape) - 3)], dtype=np.float32)
        except (ValueError, OSError, EOFError, zlib.error) as exc:
            raise ImageReadError(path, f"cannot read the voxel data: truncated or corrupt? ({exc})") from exc
        if r > a:  # the plane's axes are in voxel order; RAS wants (right, anterior)
            plane = plane.T
        if flip[r] < 0:
            plane = plane[::-1]
        if flip[a] < 0:
            plane = plane[:, ::-1]
        # RAS voxel axes are (right, anterior); rotate so anterior is up, as radiologists view an axial slice.
        slice_ = finite_or_background(path, np.rot90(plane))
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
        ImageReadError: the file is missing, not a regular file, unsupported, empty, too large, truncated or not
            an image.
    """
    path = Path(path)
    require_regular_file(path)
    reader = reader_for(path)
    if reader is None:
        raise ImageReadError(path, f"unsupported file type {''.join(path.suffixes) or '(no suffix)'}")
    return reader.read(path)
