"""Albumentations pipelines: deterministic preprocessing (shared by training and inference) plus
train-time augmentation taken from ``conf/data/transforms/*.yaml``."""

from collections.abc import Sequence

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2
from scipy.signal import wiener

from fetalbrain.data.harmonise import harmonise_steps

DENOISE_METHODS = ("none", "median", "bilateral", "wiener")


class Denoise(A.ImageOnlyTransform):
    """Speckle reduction before the network: median, bilateral or SciPy's adaptive Wiener filter."""

    def __init__(self, method: str = "median", kernel_size: int = 5, p: float = 1.0):
        super().__init__(p=p)
        if method not in DENOISE_METHODS[1:]:
            raise ValueError(f"data.denoise={method!r}: choose one of {', '.join(DENOISE_METHODS)}")
        if kernel_size < 3 or kernel_size % 2 == 0:
            raise ValueError(f"data.denoise_kernel={kernel_size}: must be an odd number >= 3")
        self.method, self.kernel_size = method, kernel_size

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        if self.method == "median":
            return cv2.medianBlur(img, self.kernel_size)
        if self.method == "bilateral":
            return cv2.bilateralFilter(img, self.kernel_size, 75, 75)
        filtered = wiener(img.astype(np.float64), mysize=self.kernel_size)
        return np.clip(np.nan_to_num(filtered), 0, 255).astype(img.dtype)

    def get_transform_init_args_names(self):
        return ("method", "kernel_size")


def preprocessing(
    image_size: int, denoise: str = "none", denoise_kernel: int = 5, clahe: bool = False, harmonise: dict | None = None
) -> list:
    """The deterministic steps every image goes through, in training and at inference; the resize is the last."""
    if denoise not in DENOISE_METHODS:
        raise ValueError(f"data.denoise={denoise!r}: choose one of {', '.join(DENOISE_METHODS)}")
    framing, content, geometry = harmonise_steps(harmonise)
    steps = framing + ([] if denoise == "none" else [Denoise(denoise, denoise_kernel)]) + content
    if clahe:
        steps.append(A.CLAHE(clip_limit=2.0, tile_grid_size=(8, 8), p=1.0))
    steps += geometry
    steps.append(A.Resize(image_size, image_size, interpolation=cv2.INTER_AREA))
    return steps


def run_preprocessing(prep: dict) -> list:
    """``preprocessing`` from what a checkpoint stores (``FetalBrainDataModule.preprocessing_config``); a checkpoint
    from before harmonisation has no ``harmonise`` entry and did none."""
    return preprocessing(
        prep["image_size"], prep["denoise"], prep["denoise_kernel"], prep["clahe"], prep.get("harmonise")
    )


def inference_pipeline(prep: dict) -> A.Compose:
    """A run's deterministic pipeline (no augmentation), image to normalised tensor: what inference applies."""
    return build_pipeline(run_preprocessing(prep), [], prep["mean"], prep["std"])


def build_pipeline(preprocess: list, augment: Sequence, mean: float, std: float) -> A.Compose:
    """preprocess → augment → normalise with grayscale statistics → CHW float tensor."""
    return A.Compose(
        [*preprocess, *augment, A.Normalize(mean=(mean,), std=(std,), max_pixel_value=255.0), ToTensorV2()]
    )
