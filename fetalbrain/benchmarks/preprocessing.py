"""What the deterministic preprocessing costs per image with each ``data/harmonise`` preset, on the training
part's images and the external normal heads: harmonisation must stay cheap next to the rest."""

import time
from pathlib import Path

from hydra import compose
from omegaconf import DictConfig, OmegaConf


def preprocessing_speed(bench: DictConfig, datamodule, external_root: Path) -> list[dict]:
    """Milliseconds per image of the deterministic preprocessing alone (decoding excluded) for each
    ``data/harmonise`` preset, on real images of the training part and of the external normal heads, each first
    resized to every longest side in ``preprocessing.sides`` (the embedded copy's 256 px, an export's 640 px)."""
    import albumentations as A
    import cv2

    from fetalbrain.data.images import read_grayscale
    from fetalbrain.data.transforms import preprocessing

    count = bench.preprocessing.images
    sources = {"dataset": datamodule.part_images("train")[0][:count]}
    external = sorted((external_root / "images").glob("*.jpg"))[:count]  # evaluation.external.root
    if external:
        sources["external (HC18)"] = [read_grayscale(path) for path in external]
    results = []
    for preset in bench.preprocessing.harmonise:
        harmonise = compose("train", [f"data/harmonise={preset}"]).data.harmonise
        steps = A.Compose(preprocessing(datamodule.hparams.image_size, harmonise=OmegaConf.to_container(harmonise)))
        for source, images in sources.items():
            for side in bench.preprocessing.sides:
                resized = [cv2.resize(im, _fit(im.shape, side), interpolation=cv2.INTER_AREA) for im in images]
                steps(image=resized[0])  # warm-up
                started = time.perf_counter()
                for image in resized:
                    steps(image=image)
                ms = (time.perf_counter() - started) * 1000 / len(resized)
                results.append({"harmonise": preset, "source": source, "side": side, "images": len(resized), "ms": ms})
    return results


def _fit(shape: tuple[int, ...], side: int) -> tuple[int, int]:
    """(width, height) with the longest side ``side`` and the aspect ratio kept."""
    scale = side / max(shape[:2])
    return max(1, round(shape[1] * scale)), max(1, round(shape[0] * scale))
