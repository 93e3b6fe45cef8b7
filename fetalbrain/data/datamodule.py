"""The LightningDataModule: table → split → decoded (cached) images → augmented tensors."""

import logging
from dataclasses import asdict
from pathlib import Path

import albumentations as A
import lightning as L
import numpy as np
import pandas as pd
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, RandomSampler, WeightedRandomSampler, get_worker_info

from fetalbrain.data.duplicates import duplicate_groups
from fetalbrain.data.head_frame import HeadFrame
from fetalbrain.data.images import ImageReadError, read_grayscale
from fetalbrain.data.readers import DatasetError, read_dataset
from fetalbrain.data.splits import assign_parts
from fetalbrain.data.synthetic import MIXES, mix_synthetic
from fetalbrain.data.transforms import build_pipeline, preprocessing
from fetalbrain.progress import track

log = logging.getLogger(__name__)


class UltrasoundDataset(Dataset):
    """Grayscale images and integer targets; decoded arrays come from the cache when given."""

    def __init__(self, paths, targets, transform, channels: int = 1, images=None):
        self.paths, self.targets, self.transform = list(paths), list(targets), transform
        self.channels, self.images = channels, images
        self._base_seed = torch.initial_seed()  # the run's seed: seed_everything ran before the data set-up
        # (epoch, rank) in shared memory: persistent loader workers keep their own copy of the dataset
        # but see what set_epoch writes here.
        self._epoch = torch.zeros(2, dtype=torch.int64).share_memory_()
        self._seeded_for = None

    def __len__(self) -> int:
        return len(self.paths)

    def set_epoch(self, epoch: int, rank: int = 0) -> None:
        """Called before each training epoch and on resume (``ReproducibleEpochs``): augmentation depends on
        the epoch, not on the process's history, so a resumed run sees the uninterrupted run's augmentations."""
        self._epoch[0], self._epoch[1] = epoch, rank

    def _seed_transform(self) -> None:
        """albumentations keeps its own RNG: seed it from (seed, epoch, rank, loader worker), reproducible,
        distinct in each worker and each epoch, and the same whether the run was resumed or not."""
        worker = get_worker_info()
        key = (*self._epoch.tolist(), worker.id if worker is not None else 0)
        if key != self._seeded_for:
            seed = np.random.SeedSequence([self._base_seed, *key]).generate_state(1)[0]
            self.transform.set_random_seed(int(seed))
            self._seeded_for = key

    def __getitem__(self, index: int):
        self._seed_transform()
        image = self.images[index] if self.images is not None else read_grayscale(self.paths[index])
        tensor = self.transform(image=image)["image"]
        if self.channels == 3:  # an RGB backbone: replicate the grey channel
            tensor = tensor.expand(3, -1, -1).contiguous()
        return tensor, self.targets[index]


class FetalBrainDataModule(L.LightningDataModule):
    def __init__(
        self,
        root: str,
        format: str = "auto",
        splitter: str = "grouped",
        group_level: str = "case",
        near_duplicate_threshold: int | None = 6,
        num_folds: int = 5,
        fold: int = 0,
        val_num_folds: int = 5,
        split_seed: int = 42,
        image_size: int = 128,
        channels: int = 1,
        denoise: str = "none",
        denoise_kernel: int = 5,
        clahe: bool = False,
        harmonise: dict | None = None,
        head_cache: str | None = None,
        transforms: dict | None = None,
        mean: float | None = None,
        std: float | None = None,
        batch_size: int = 32,
        num_workers: int = 2,
        cache: bool = True,
        on_bad_image: str = "error",
        sampler: str = "none",
        synthetic: str | None = None,
        mix: str = "real",
        synthetic_ratio: float = 0.5,
        limitations: list[str] | None = None,
    ):
        super().__init__()
        if group_level not in ("source", "case"):
            raise ValueError(f"data.group_level={group_level!r}: choose source or case")
        if channels not in (1, 3):
            raise ValueError(f"data.channels={channels}: must be 1 or 3")
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"data.on_bad_image={on_bad_image!r}: choose error or skip")
        if sampler not in ("none", "weighted"):
            raise ValueError(f"data.sampler={sampler!r}: choose none or weighted")
        if mix not in MIXES:
            raise ValueError(f"data.mix={mix!r}: choose one of {', '.join(MIXES)}")
        limitations = [str(text) for text in limitations or []]  # plain values: checkpoints load weights_only
        harmonise = OmegaConf.to_container(harmonise) if isinstance(harmonise, DictConfig) else dict(harmonise or {})
        self.preprocess = preprocessing(image_size, denoise, denoise_kernel, clahe, harmonise)  # bad keys fail here
        self.save_hyperparameters(ignore=["transforms"])
        self.augment_cfg = (transforms or {}).get("augment") or []
        self.table = None  # set by setup(): path, label, split, source, case, group, part, target
        self.skipped: list[dict] = []
        self.synthetic: dict | None = None  # what data.mix added to the training part
        self.head_frame = None  # with data.harmonise.head_frame: what the frame did with each image (setup())

    # ---- set-up ---------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.table is not None:
            return
        hp = self.hparams
        table, self.class_names = read_dataset(hp.root, hp.format)
        images = self._decode_all(table)
        keep = [i for i, image in enumerate(images) if image is not None]
        table = table.iloc[keep].reset_index(drop=True)
        images = [images[i] for i in keep]
        table["group"] = duplicate_groups(table, images, hp.group_level, hp.near_duplicate_threshold)
        table, self.split_report = assign_parts(
            table,
            hp.splitter,
            num_folds=hp.num_folds,
            fold=hp.fold,
            val_num_folds=hp.val_num_folds,
            seed=hp.split_seed,
        )
        table, self.synthetic = mix_synthetic(
            table, self.class_names, hp.synthetic, hp.mix, hp.synthetic_ratio, hp.split_seed, hp.image_size
        )
        images += self._decode_all(table.iloc[len(images) :])  # synthetic rows, appended after the real ones
        table["target"] = table["label"].map({name: i for i, name in enumerate(self.class_names)})
        self.table = table
        self.head_frame = self._frame_heads(table, images)
        if not (table["part"] == "train").any():
            raise DatasetError(f"{hp.root}: the training part is empty after splitting")
        self.datasets = {}
        for part in ("train", "val", "test"):
            rows = np.flatnonzero(table["part"] == part)
            self.datasets[part] = UltrasoundDataset(
                table["path"].iloc[rows],
                table["target"].iloc[rows],
                None,
                hp.channels,
                [images[i] for i in rows] if hp.cache else None,
            )
        # Normalisation statistics of the training images as the network receives them (after preprocessing).
        train_images = self.preprocessed_images("train")[0]
        self.mean = hp.mean if hp.mean is not None else float(np.mean([im.mean() for im in train_images]) / 255)
        self.std = hp.std if hp.std is not None else _pixel_std(train_images, self.mean)
        augment = [instantiate(t) for t in self.augment_cfg]
        for part, dataset in self.datasets.items():
            dataset.transform = build_pipeline(self.preprocess, augment if part == "train" else [], self.mean, self.std)
        log.info("Data: %s, split %s", self.split_report.part_sizes, hp.splitter)

    def _decode_all(self, table) -> list:
        """Decode each image once: bad files fail now (or are skipped and listed), not mid-epoch."""
        images = []
        for path in table["path"]:
            try:
                images.append(read_grayscale(path))
            except ImageReadError as error:
                if self.hparams.on_bad_image == "error":
                    raise DatasetError(f"{error}. Set data.on_bad_image=skip to leave such files out.") from error
                self.skipped.append({"path": path, "error": str(error)})
                images.append(None)
        if self.skipped:
            log.warning(
                "Skipped %d unreadable image(s) (data.on_bad_image=skip): %s",
                len(self.skipped),
                "; ".join(s["error"] for s in self.skipped[:5]),
            )
        return images

    def _frame_heads(self, table, images):
        """With the head frame: its decision for every image, made now (the finder runs once per image, or not at
        all for images in ``data.head_cache``) so training's epochs only crop; the finder's SHA256 is recorded in
        the run's preprocessing. A table (path, label, part, framed, found, reason, confidence, ellipse) or None."""
        frame = next((step for step in self.preprocess if isinstance(step, HeadFrame)), None)
        if frame is None:
            return None
        cache = self.hparams.head_cache
        if cache:
            frame.read_cache(cache)
        decisions = [frame.decide(image) for image in track(images, "Finding each image's head")]
        if cache:
            frame.write_cache(cache)
        self.hparams.harmonise["head_finder_sha256"] = frame.finder_sha256
        rows = table[["path", "label", "part"]].reset_index(drop=True)
        found = pd.DataFrame([decision.as_row() for decision in decisions])
        found = pd.concat([rows, found], axis=1)
        by_class = found.groupby("label")["framed"].mean()
        log.info(
            "Head frame: %d of %d images framed on their head (lowest per class: %s)",
            int(found["framed"].sum()),
            len(found),
            ", ".join(f"{label} {rate:.0%}" for label, rate in by_class.sort_values().head(3).items()),
        )
        return found

    def head_frame_summary(self) -> dict | None:
        """How often the head frame found a head, overall and per class, and why it kept whole frames."""
        if self.head_frame is None:
            return None
        table = self.head_frame
        kept = table.loc[~table["framed"], "reason"].str.replace(r" \(.*?\)", "", regex=True).value_counts()
        return {
            "images": len(table),
            "framed": int(table["framed"].sum()),
            "found": int(table["found"].sum()),
            "framed_by_class": {k: float(v) for k, v in table.groupby("label")["framed"].mean().items()},
            "found_by_class": {k: float(v) for k, v in table.groupby("label")["found"].mean().items()},
            "whole_frame_reasons": {k: int(v) for k, v in kept.items()},
            "finder_sha256": self.hparams.harmonise.get("head_finder_sha256"),
        }

    # ---- what the model and the reports need ----------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def train_class_counts(self) -> torch.Tensor:
        targets = self.table.loc[self.table["part"] == "train", "target"].to_numpy()
        return torch.as_tensor(np.bincount(targets, minlength=self.num_classes), dtype=torch.float32)

    def part_table(self, part: str):
        return self.table[self.table["part"] == part].reset_index(drop=True)

    def part_images(self, part: str) -> tuple[list[np.ndarray], np.ndarray]:
        """The decoded (unaugmented) images of a part and their targets."""
        dataset = self.datasets[part]
        images = dataset.images if dataset.images is not None else [read_grayscale(p) for p in dataset.paths]
        return images, np.asarray(dataset.targets)

    def preprocessed_images(self, part: str) -> tuple[list[np.ndarray], np.ndarray]:
        """The images of a part after the deterministic preprocessing (uint8, the network's size, before
        normalisation): what the network sees, and what the shortcut check must be given."""
        images, targets = self.part_images(part)
        steps = A.Compose(self.preprocess)
        return [steps(image=image)["image"] for image in images], targets

    def preprocessing_config(self) -> dict:
        """Everything inference needs to reproduce training's input pipeline."""
        hp = self.hparams
        return {
            "image_size": hp.image_size,
            "channels": hp.channels,
            "mean": self.mean,
            "std": self.std,
            "denoise": hp.denoise,
            "denoise_kernel": hp.denoise_kernel,
            "clahe": hp.clahe,
            "harmonise": dict(hp.harmonise),
        }

    def data_summary(self) -> dict:
        hp = self.hparams
        grouped = hp.splitter == "grouped"
        return {
            "root": str(Path(hp.root)),
            "split": asdict(self.split_report),
            "fold": hp.fold if grouped else None,
            "num_folds": hp.num_folds if grouped else None,
            "group_level": hp.group_level,
            "split_seed": hp.split_seed,
            "limitations": list(hp.limitations or []),
            "skipped_images": self.skipped,
            "synthetic": self.synthetic,
            "head_frame": self.head_frame_summary(),
        }

    # ---- loaders --------------------------------------------------------------------------------
    def set_epoch(self, epoch: int, rank: int = 0) -> None:
        """Training augmentation follows the epoch (see ``UltrasoundDataset.set_epoch``)."""
        if "train" in getattr(self, "datasets", {}):
            self.datasets["train"].set_epoch(epoch, rank)

    def _loader(self, part: str, train: bool = False) -> DataLoader:
        dataset = self.datasets[part]
        sampler = None
        if train and self.hparams.sampler == "weighted":
            counts = np.bincount(dataset.targets, minlength=self.num_classes)
            weights = 1.0 / counts[np.asarray(dataset.targets)]
            sampler = WeightedRandomSampler(torch.as_tensor(weights, dtype=torch.double), len(dataset))
        elif train:
            sampler = RandomSampler(dataset)  # what shuffle=True builds: order from the global torch RNG
        workers = self.hparams.num_workers
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            sampler=sampler,
            drop_last=train and len(dataset) > self.hparams.batch_size,  # no size-1 BatchNorm batch
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            # Workers' base seed from the loader's own generator, not the global RNG: persistent workers
            # start at epoch 0, or at the first epoch after a resume, where that draw would shift the shuffling.
            generator=torch.Generator().manual_seed(torch.initial_seed()) if workers > 0 else None,
        )

    def train_dataloader(self):
        return self._loader("train", train=True)

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")


def _pixel_std(images: list[np.ndarray], mean: float) -> float:
    second_moment = np.mean([np.mean((im.astype(np.float64) / 255) ** 2) for im in images])
    return float(np.sqrt(max(second_moment - mean**2, 1e-12)))
