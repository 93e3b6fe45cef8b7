"""Decode one image file into the 8-bit grayscale array every model in the project consumes.

Reads what ultrasound machines and users produce: JPEG, PNG, BMP, TIFF (8 or 16 bit, grey, RGB or
RGBA) and DICOM (``pydicom``; MONOCHROME1 inverted, the middle frame of a cine loop). Non-8-bit
data is scaled min-max to 0-255. Errors name the file.
"""

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
DICOM_EXTENSIONS = (".dcm", ".dicom")
# Larger images are refused before decoding: a 20k x 20k upload would need GBs of memory.
MAX_PIXELS = 8192 * 8192


class ImageReadError(ValueError):
    """An image file could not be decoded; the message names the file."""


def _scale_to_uint8(array: np.ndarray) -> np.ndarray:
    array = array.astype(np.float32)
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
    return scaled.round().astype(np.uint8)


def colourfulness(rgb: np.ndarray) -> float:
    """Mean absolute difference between colour channels (0-255): ultrasound is grey (near 0)."""
    rgb = rgb[..., :3].astype(np.int16)
    return float((np.abs(rgb[..., 0] - rgb[..., 1]) + np.abs(rgb[..., 1] - rgb[..., 2])).mean() / 2)


def to_grayscale_uint8(image: Image.Image) -> tuple[np.ndarray, float]:
    """Any PIL mode (RGB, RGBA, palette, 16-bit, float) to HxW uint8, with its colourfulness."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return _scale_to_uint8(np.asarray(image)), 0.0
    if image.mode in ("RGBA", "LA", "P", "PA"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image).convert("RGB")
    colour = colourfulness(np.asarray(image)) if image.mode == "RGB" else 0.0
    return np.asarray(image.convert("L"), dtype=np.uint8), colour


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_EXTENSIONS:
        return True
    with open(path, "rb") as handle:
        return handle.read(132)[128:132] == b"DICM"


def _read_dicom(path: Path) -> tuple[np.ndarray, float]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        dataset = pydicom.dcmread(path)
        rows, columns = int(dataset.Rows), int(dataset.Columns)
        if rows * columns > MAX_PIXELS:
            raise ImageReadError(f"{path}: DICOM image of {columns}x{rows} pixels is larger than the limit")
        pixels = dataset.pixel_array
    except ImageReadError:
        raise
    except (InvalidDicomError, AttributeError, ValueError, RuntimeError, OSError) as error:
        raise ImageReadError(f"{path}: not a readable DICOM image ({error})") from error
    samples = int(getattr(dataset, "SamplesPerPixel", 1))
    frames = int(getattr(dataset, "NumberOfFrames", 1) or 1)
    if frames > 1:  # a cine loop: the middle frame
        pixels = pixels[frames // 2]
    colour = 0.0
    if samples == 3:
        colour = colourfulness(pixels)
        pixels = pixels[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    gray = _scale_to_uint8(pixels) if pixels.dtype != np.uint8 or samples == 3 else pixels
    if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
        gray = 255 - gray
    return np.ascontiguousarray(gray), colour


def read_image(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode ``path`` fully (truncated files fail here): grayscale uint8 and its colourfulness."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(f"{path}: empty file")
        if is_dicom(path):
            return _read_dicom(path)
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ImageReadError(
                    f"{path}: image of {image.width}x{image.height} pixels is larger than the {MAX_PIXELS} pixel limit"
                )
            image.load()
            return to_grayscale_uint8(image)
    except ImageReadError:
        raise
    except FileNotFoundError as error:
        raise ImageReadError(f"{path}: file not found") from error
    except Image.DecompressionBombError as error:  # PIL refuses very large images before we can look
        raise ImageReadError(f"{path}: image is larger than the {MAX_PIXELS} pixel limit ({error})") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"{path}: not a readable image ({error})") from error


CENTIMETRES = 3  # DICOM's PhysicalUnitsXDirection code for cm


def pixel_spacing_mm(path: str | Path) -> tuple[float, float] | None:
    """(x, y) size of a pixel in mm, for a DICOM that says it: ``PixelSpacing`` (row, column spacing in mm), else
    the first ultrasound region's ``PhysicalDeltaX``/``Y`` given in cm (the ultrasound module's own calibration).
    None for other files, or a DICOM without a calibration: a measure then stays in pixels."""
    path = Path(path)
    try:
        if not path.is_file() or not is_dicom(path):
            return None
        import pydicom

        dataset = pydicom.dcmread(path, stop_before_pixels=True)
    except (OSError, ValueError, AttributeError):
        return None
    try:  # a malformed tag (one value, text) is no calibration, never an error
        spacing = getattr(dataset, "PixelSpacing", None)
        if isinstance(spacing, (list, tuple, pydicom.multival.MultiValue)) and len(spacing) == 2:
            rows, columns = float(spacing[0]), float(spacing[1])
            if rows > 0 and columns > 0:
                return columns, rows
        for region in getattr(dataset, "SequenceOfUltrasoundRegions", None) or []:
            units = (getattr(region, "PhysicalUnitsXDirection", None), getattr(region, "PhysicalUnitsYDirection", None))
            dx, dy = getattr(region, "PhysicalDeltaX", None), getattr(region, "PhysicalDeltaY", None)
            if units == (CENTIMETRES, CENTIMETRES) and dx and dy and float(dx) != 0 and float(dy) != 0:
                return abs(float(dx)) * 10.0, abs(float(dy)) * 10.0
    except (TypeError, ValueError, AttributeError):
        return None
    return None


def read_grayscale(path: str | Path) -> np.ndarray:
    return read_image(path)[0]
