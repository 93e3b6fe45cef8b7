"""Decode one image file into the 8-bit grayscale array every model in the project consumes."""

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
# Larger images are refused before decoding: a 20k x 20k upload would need GBs of memory.
MAX_PIXELS = 8192 * 8192


class ImageReadError(ValueError):
    """An image file could not be decoded; the message names the file."""


def to_grayscale_uint8(image: Image.Image) -> np.ndarray:
    """Any PIL mode (RGB, RGBA, palette, 16-bit, float) to an HxW uint8 array."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        return scaled.round().astype(np.uint8)
    if image.mode in ("RGBA", "LA", "P"):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(background, image)
    return np.asarray(image.convert("L"), dtype=np.uint8)


def read_grayscale(path: str | Path) -> np.ndarray:
    """Decode ``path`` fully (truncated files fail here, not mid-training)."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(f"{path}: empty file")
        with Image.open(path) as image:
            if image.width * image.height > MAX_PIXELS:
                raise ImageReadError(
                    f"{path}: image of {image.width}x{image.height} pixels is larger than the "
                    f"{MAX_PIXELS} pixel limit"
                )
            image.load()
            return to_grayscale_uint8(image)
    except ImageReadError:
        raise
    except FileNotFoundError as error:
        raise ImageReadError(f"{path}: file not found") from error
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as error:
        raise ImageReadError(f"{path}: not a readable image ({error})") from error
