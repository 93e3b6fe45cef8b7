"""Fetal heads with their skull ellipses, for training and checking the head finder.

A labelled folder whose ``labels.csv`` carries each image's head ellipse (``fetalbrain.data.compact --outlines``;
the shipped ``data/hc18-normal-heads`` has HC18's 895 outlines) becomes image/mask pairs: the mask is the filled
ellipse, drawn at the network's input size from the ellipse itself (no interpolated masks). Frames of one subject
stay in one part; parts are drawn per head-width bin so that early and late pregnancies are in each.
"""

from types import SimpleNamespace

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from fetalbrain.data.compact import HEAD_COLUMNS
from fetalbrain.data.ellipses import Ellipse, ellipse_mask
from fetalbrain.data.images import read_grayscale
from fetalbrain.data.readers import DatasetError, read_labelled_folder
from fetalbrain.project import plain

PARTS = ("train", "val", "test")


def read_heads(root) -> pd.DataFrame:
    """The folder's images with their ellipses as numbers; refuses a folder without them, naming the column or
    the file."""
    table = read_labelled_folder(root)
    missing = [c for c in HEAD_COLUMNS if c not in table.columns]
    if missing:
        raise DatasetError(
            f"{root}/labels.csv: no head ellipses (missing {', '.join(missing)}); make the folder with "
            "python -m fetalbrain.data.compact SRC DST --outlines OUTLINES"
        )
    for column in HEAD_COLUMNS:
        values = pd.to_numeric(table[column], errors="coerce")
        if values.isna().any():
            raise DatasetError(f"{root}/labels.csv: {column} of {table['file'][values.isna()].iloc[0]} is not a number")
        table[column] = values
    return table


def split_by_subject(table: pd.DataFrame, val: float, test: float, seed: int, edges: list[float]) -> pd.Series:
    """Each image's part (train / val / test): whole subjects, drawn within each bin of their median head width
    (``edges``), so every part spans the gestational ages."""
    if not (0 < val < 1 and 0 < test < 1 and val + test < 1):
        raise ValueError(f"head finder split: val={val} and test={test} must be fractions with val + test < 1")
    width = table.groupby("subject")["head_width_fraction"].median()
    bins = pd.cut(width, edges, include_lowest=True)
    rng = np.random.default_rng(seed)
    part_of = {}
    for _, subjects in width.groupby(bins, observed=True):
        order = rng.permutation(subjects.index.to_numpy())
        n_test, n_val = round(len(order) * test), round(len(order) * val)
        for index, subject in enumerate(order):
            part_of[subject] = "test" if index < n_test else "val" if index < n_test + n_val else "train"
    return table["subject"].map(part_of).fillna("train")


def ellipse_of(row) -> Ellipse:
    return Ellipse(row.head_cx, row.head_cy, row.head_semi_major, row.head_semi_minor, row.head_angle)


class HeadDataset(Dataset):
    """(image, mask) tensors of ``size`` x ``size``: the grey image resized to the square (as the finder sees every
    image, whatever its shape) and the filled ellipse moved with it. ``augment``: an albumentations pipeline
    applied to both before normalisation (mean 0.5, std 0.25 of the 0-1 range)."""

    def __init__(self, table: pd.DataFrame, size: int, augment=None):
        self.table, self.size, self.augment = table.reset_index(drop=True), size, augment
        self.images = [read_grayscale(p) for p in self.table["path"]]
        self._base_seed, self._seeded_for = torch.initial_seed(), None
        # (epoch, rank) in shared memory: persistent loader workers keep their own copy of the dataset but see
        # what set_epoch writes here (as the classifier's UltrasoundDataset)
        self._epoch = torch.zeros(2, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.table)

    def set_epoch(self, epoch: int, rank: int = 0) -> None:
        """Augmentation follows (epoch, rank, loader worker), as the classifier's: a resumed run sees the same
        augmentations, and workers draw different ones."""
        self._epoch[0], self._epoch[1] = epoch, rank

    def __getitem__(self, index: int):

        if self.augment is not None:
            worker = get_worker_info()
            key = (*self._epoch.tolist(), worker.id if worker is not None else 0)
            if key != self._seeded_for:
                self.augment.set_random_seed(int(np.random.SeedSequence([self._base_seed, *key]).generate_state(1)[0]))
                self._seeded_for = key
        image, row = self.images[index], self.table.iloc[index]
        height, width = image.shape
        ellipse = ellipse_of(row).scaled(self.size / width, self.size / height)
        resized = to_square(image, self.size)
        mask = ellipse_mask(ellipse, (self.size, self.size))
        if self.augment is not None:
            out = self.augment(image=resized, mask=mask)
            resized, mask = out["image"], out["mask"]
        return to_input(resized), torch.from_numpy(mask.astype(np.float32))[None]


INPUT_MEAN, INPUT_STD = 0.5, 0.25  # the finder's input normalisation, of the 0-1 range


def to_square(image: np.ndarray, size: int) -> np.ndarray:
    """The image as the finder sees every image, whatever its shape: resized to ``size`` x ``size``."""
    import cv2

    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)


def to_input(image: np.ndarray) -> torch.Tensor:
    """A grey uint8 image (already square, at the input size) as the finder's input tensor (1, H, W)."""
    return (torch.from_numpy(image.astype(np.float32) / 255.0)[None] - INPUT_MEAN) / INPUT_STD


def head_augmentation(options):
    """Random zoom (small and large heads), aspect stretch (square exports), rotation, shift, flips and grey-level
    changes: the finder meets heads of every size, shape and scanner."""
    import albumentations as A
    import cv2

    return A.Compose(
        [
            A.Affine(
                scale={"x": tuple(options.scale), "y": tuple(options.scale)},
                rotate=tuple(options.rotate),
                translate_percent=tuple(options.translate),
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=1.0,
            ),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.RandomBrightnessContrast(brightness_limit=options.brightness, contrast_limit=options.contrast, p=0.8),
            A.GaussNoise(std_range=(0.0, options.noise), p=0.3),
        ]
    )


class HeadOutlinesDataModule(L.LightningDataModule):
    """Heads with ellipses (``read_heads``), split by subject within head-width bins, as square image/mask pairs:
    what ``model=head_finder`` trains on. ``class_names`` is ``["head"]``: one foreground."""

    class_names = ["head"]

    def __init__(
        self,
        root: str,
        image_size: int = 160,
        batch_size: int = 16,
        num_workers: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        bins: list[float] = (0, 0.35, 0.45, 0.55, 0.65, 1.0),
        augment: dict | None = None,
        limitations: list[str] = (),
    ):
        super().__init__()
        self.save_hyperparameters(  # plain containers: checkpoints are read with weights_only
            {
                "root": str(root),
                "image_size": image_size,
                "batch_size": batch_size,
                "num_workers": num_workers,
                "val_fraction": val_fraction,
                "test_fraction": test_fraction,
                "split_seed": split_seed,
                "bins": list(plain(bins)),
                "augment": plain(augment),
                "limitations": list(plain(limitations)),
            }
        )

    def setup(self, stage: str | None = None) -> None:
        if getattr(self, "datasets", None):
            return
        hp = self.hparams
        table = read_heads(hp.root)
        table["part"] = split_by_subject(table, hp.val_fraction, hp.test_fraction, hp.split_seed, list(hp.bins))
        self.table = table
        augment = head_augmentation(SimpleNamespace(**hp.augment)) if hp.augment else None
        self.datasets = {
            part: HeadDataset(table[table["part"] == part], hp.image_size, augment if part == "train" else None)
            for part in PARTS
        }

    def set_epoch(self, epoch: int, rank: int = 0) -> None:
        self.datasets["train"].set_epoch(epoch, rank)

    def _loader(self, part: str, train: bool = False) -> DataLoader:
        return DataLoader(
            self.datasets[part],
            batch_size=self.hparams.batch_size,
            shuffle=train,
            drop_last=train and len(self.datasets[part]) > self.hparams.batch_size,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self):
        return self._loader("train", train=True)

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    def preprocessing_config(self) -> dict:
        """What a finder needs to see an image as in training: grey, resized to a square (``to_square``),
        normalised (``to_input``)."""
        size = self.hparams.image_size
        return {"image_size": size, "channels": 1, "mean": INPUT_MEAN, "std": INPUT_STD, "resize": "square"}

    def data_summary(self) -> dict:
        """The run summary's data part, in the classifier's keys where they mean the same (the model card reads
        them): images per part, and subjects per part."""
        table, hp = self.table, self.hparams
        in_part = {part: table[table["part"] == part] for part in PARTS}
        return {
            "root": str(hp.root),
            "split": {
                "splitter": f"by subject, within head-width bins (split seed {hp.split_seed})",
                "part_sizes": {part: len(rows) for part, rows in in_part.items()},
                "subjects": {part: int(rows["subject"].nunique()) for part, rows in in_part.items()},
            },
            "bins": list(hp.bins),
            "limitations": list(hp.limitations),
        }
