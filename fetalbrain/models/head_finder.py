"""The head finder's training and report: a small U-Net (segmentation-models-pytorch) that segments the fetal
skull in HC18's heads (``python -m fetalbrain.train model=head_finder``); the trained finder at work (the ellipse,
its confidence, the reasons for finding none) is ``fetalbrain.data.head_finding``.

The encoder is timm's EfficientNet-Lite0; ``weights: packaged:efficientnet-lite0`` starts it from the ImageNet
weights that ship in a pip package (offline).
"""

from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch

from fetalbrain.data.ellipses import ellipse_mask
from fetalbrain.data.head_finding import HeadFinder, finder_options, head_net
from fetalbrain.project import plain
from fetalbrain.runs.layout import Report


def build_head_net(encoder: str, weights: str | None, decoder_channels) -> torch.nn.Module:
    """smp's U-Net, one grey input channel, one output (skull-interior logit); the encoder from ``weights``."""
    net = head_net(encoder, decoder_channels)
    net.pretrained_source = "none"  # the run summary's and model card's "pretrained weights"
    if weights:
        load_encoder_weights(net, encoder, weights)
        net.pretrained_source = f"encoder: {weights}"
    return net


def load_encoder_weights(net, encoder: str, weights: str) -> None:
    """ImageNet weights of a timm classifier into smp's timm-universal encoder (``tu-<name>``): the features'
    tensors, the first conv summed to one channel; the classifier's head is not part of the encoder."""
    from timm.models import adapt_input_conv

    from fetalbrain.models.backbones import _match_keys, read_state_dict, resolve_weights_path

    if not encoder.startswith("tu-"):
        raise ValueError(f"head_finder.net.encoder={encoder!r}: weights load into timm encoders (tu-<timm name>)")
    name, path = encoder[3:], resolve_weights_path(weights)
    state = _match_keys(name, read_state_dict(path), path)
    own = net.encoder.model.state_dict()
    state = {k: v for k, v in state.items() if k in own}
    if "conv_stem.weight" in state and state["conv_stem.weight"].shape[1] != 1:
        state["conv_stem.weight"] = adapt_input_conv(1, state["conv_stem.weight"])
    missing = sorted(set(own) - set(state))
    if missing:
        raise ValueError(f"{path}: no weights for encoder tensors {missing[:5]}")
    net.encoder.model.load_state_dict(state)


# ---- training: python -m fetalbrain.train model=head_finder ------------------------------------------------------
class HeadFinderModule(L.LightningModule):
    """The finder's training (Dice + binary cross-entropy on the filled skull ellipse) and its report: on held-out
    subjects, each image at its own size, Dice and the ellipse's errors against the drawn one, per head-width bin."""

    task = "head_finding"  # the run summary's task

    def __init__(
        self,
        class_names: list[str],
        preprocessing: dict,
        optimizer: partial | None = None,
        scheduler: partial | None = None,
        name: str = "head_finder",
        net: dict | None = None,
        dice_weight: float = 1.0,
        find: dict | None = None,
        monitor: str = "val/dice",
    ):
        super().__init__()
        net, find = dict(plain(net or {})), dict(plain(find or {}))
        self.save_hyperparameters(
            {
                "class_names": list(plain(class_names)),
                "preprocessing": dict(plain(preprocessing)),
                "name": name,
                "net": net,
                "dice_weight": dice_weight,
                "find": find,
                "monitor": monitor,
            }
        )
        self.net = build_head_net(net["encoder"], net.get("weights"), net["decoder_channels"])
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        import segmentation_models_pytorch as smp
        from torchmetrics import MaxMetric, MeanMetric

        self.dice_loss = smp.losses.DiceLoss(mode="binary", from_logits=True)
        self.val_dice, self.best_val_dice = MeanMetric(), MaxMetric()  # the best epoch's: what sweepers optimise

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def _loss(self, logits, masks):
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks)
        return bce + self.hparams.dice_weight * self.dice_loss(logits, masks)

    def training_step(self, batch, batch_idx):
        images, masks = batch
        loss = self._loss(self(images), masks)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(images))
        return loss

    def validation_step(self, batch, batch_idx):
        images, masks = batch
        logits = self(images)
        self.log("val/loss", self._loss(logits, masks), on_step=False, on_epoch=True, batch_size=len(images))
        predicted = (logits > 0).float()
        overlap = (predicted * masks).sum(dim=(1, 2, 3))
        total = predicted.sum(dim=(1, 2, 3)) + masks.sum(dim=(1, 2, 3))
        dice = torch.where(total > 0, 2 * overlap / total.clamp(min=1), torch.ones_like(total))
        self.val_dice.update(dice)

    def on_validation_epoch_end(self):
        dice = self.val_dice.compute()
        self.val_dice.reset()
        if not self.trainer.sanity_checking:
            self.best_val_dice.update(dice)
        self.log("val/dice", dice)
        self.log("val/dice_best", self.best_val_dice.compute() if self.best_val_dice.update_count else dice)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer=optimizer)}

    def finder(self) -> "HeadFinder":
        return HeadFinder(self.net, self.hparams.preprocessing["image_size"], finder_options(self.hparams.find))

    def report(self, trainer, datamodule, run_dir: Path, options=None) -> Report:
        """The best validation epoch's finder on the held-out subjects (``head_finder_test.csv`` per image,
        ``head_finder_by_bin.csv``, ``head_finder_examples.png``); metrics ``test/...`` overall and per bin."""
        from fetalbrain.data.head_outlines import ellipse_of
        from fetalbrain.evaluation.head_fit import dice, ellipse_errors, summarise_by_bin

        if not trainer.is_global_zero:
            return Report({}, [], {})
        run_dir = Path(run_dir)
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        if best:
            from fetalbrain.runs.checkpoints import read_checkpoint

            self.load_state_dict(read_checkpoint(best)["state_dict"])
        finder, dataset = self.finder(), datamodule.datasets["test"]
        rows = []
        for image, row in zip(dataset.images, dataset.table.itertuples()):
            truth = ellipse_of(row)
            found = finder(image)
            truth_mask = ellipse_mask(truth, image.shape)
            mask = found.probability >= finder.options.threshold if found.probability is not None else truth_mask * 0
            rows.append(
                {
                    "file": row.file,
                    "subject": row.subject,
                    "head_width_fraction": row.head_width_fraction,
                    "found": found.found,
                    "reason": found.reason,
                    "confidence": found.confidence,
                    "dice": dice(mask, truth_mask),
                    **ellipse_errors(found.ellipse, truth),
                    **truth.as_dict("true_"),
                    **(found.ellipse.as_dict("found_") if found.ellipse else {}),
                }
            )
        per_image = pd.DataFrame(rows)
        per_image.to_csv(run_dir / TEST_FILE, index=False)
        by_bin = summarise_by_bin(per_image, list(datamodule.hparams.bins))
        by_bin.to_csv(run_dir / BINS_FILE, index=False)
        metrics = {}
        for row in by_bin.itertuples():
            prefix = "test/" if row.bin == "all" else f"test/head_width_{row.bin}/"
            metrics[f"{prefix}images"] = float(row.images)
            metrics[f"{prefix}found"] = row.found
            for column in ("dice_mean", "centre_px_median", "circumference_px_median", "circumference_rel_median"):
                metrics[f"{prefix}{column}"] = getattr(row, column)
        figure = examples_figure(dataset.images, per_image, run_dir / EXAMPLES_FILE)
        notes = (
            [
                f"{(~per_image['found']).sum()} of {len(per_image)} held-out heads not found: "
                + "; ".join(f"{n}× {r}" for r, n in per_image.loc[~per_image["found"], "reason"].value_counts().items())
            ]
            if (~per_image["found"]).any()
            else []
        )
        return Report(metrics, notes, {"head_finder/examples": figure})


TEST_FILE = "head_finder_test.csv"
BINS_FILE = "head_finder_by_bin.csv"
EXAMPLES_FILE = "head_finder_examples.png"


def examples_figure(images: list[np.ndarray], per_image: pd.DataFrame, path: Path, count: int = 8) -> Path:
    """Held-out heads evenly across the head-width range, smallest first: the drawn ellipse (green) and the found
    one (red), each with its Dice and the finder's confidence or its reason for finding none."""
    import cv2
    import matplotlib.pyplot as plt

    from fetalbrain.evaluation import plots

    order = per_image.sort_values("head_width_fraction").index.to_numpy()
    chosen = order[np.linspace(0, len(order) - 1, min(count, len(order))).round().astype(int)]
    fig, axes = plt.subplots(2, (len(chosen) + 1) // 2, figsize=(3 * ((len(chosen) + 1) // 2), 5), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, index in zip(axes.ravel(), chosen):
        row = per_image.loc[index]
        canvas = cv2.cvtColor(images[index], cv2.COLOR_GRAY2RGB)
        for prefix, colour in (("true_", (0, 200, 0)), ("found_", (230, 30, 30))):
            if pd.notna(row.get(f"{prefix}cx")):
                centre = (round(row[f"{prefix}cx"]), round(row[f"{prefix}cy"]))
                axes_px = (round(row[f"{prefix}semi_major"]), round(row[f"{prefix}semi_minor"]))
                cv2.ellipse(canvas, centre, axes_px, row[f"{prefix}angle"], 0, 360, colour, 1)
        ax.imshow(canvas)
        state = f"conf {row['confidence']:.2f}" if row["found"] else f"not found: {row['reason'][:28]}"
        ax.set_title(f"width {row['head_width_fraction']:.2f} · Dice {row['dice']:.2f}\n{state}", fontsize=7)
    fig.suptitle("Head finder on held-out subjects: drawn (green) and found (red) skull ellipses", fontsize=9)
    return plots._save(fig, path)


def slim_checkpoint(checkpoint: Path, out: Path) -> str:
    """A finder's weights (float16) and settings alone, without optimizer state or logs: what the project ships
    (``python -m fetalbrain.export ckpt=RUN_CKPT format=slim``). Writes ``out`` and ``out.sha256``; returns the
    SHA256."""
    from fetalbrain.runs.checkpoints import read_checkpoint
    from fetalbrain.runs.integrity import sha256_file

    state = read_checkpoint(checkpoint)
    hparams = dict(state.get("hyper_parameters") or {})
    if "find" not in hparams or "net" not in hparams:
        raise ValueError(f"ckpt={checkpoint}: not a head finder's checkpoint (format=slim is for model=head_finder)")
    weights = {
        k: v.half() if v.is_floating_point() else v for k, v in state["state_dict"].items() if k.startswith("net.")
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"hyper_parameters": hparams, "state_dict": weights, "epoch": state.get("epoch")}, out)
    digest = sha256_file(out)
    out.with_suffix(".sha256").write_text(f"{digest}  {out.name}\n")
    return digest
