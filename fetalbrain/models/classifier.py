"""The one LightningModule for classification: any net, cross-entropy, per-stage metric collections."""

from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from fetalbrain.evaluation.metrics import classification_metrics
from fetalbrain.runs import Report, read_checkpoint


class Classifier(L.LightningModule):
    task = "classification"

    def __init__(
        self,
        net: dict | DictConfig,
        class_names: list[str],
        name: str = "",
        optimizer: partial | None = None,
        scheduler: partial | None = None,
        label_smoothing: float = 0.0,
        class_weighting: str = "none",
        freeze_backbone_epochs: int = 0,
        backbone_lr_factor: float = 1.0,
        channels_last: bool = True,
        compile: bool = False,
        monitor: str = "val/f1_macro",
        preprocessing: dict | None = None,
    ):
        super().__init__()
        if class_weighting not in ("none", "balanced"):
            raise ValueError(f"model.class_weighting={class_weighting!r}: choose none or balanced")
        net = OmegaConf.to_container(net, resolve=True) if isinstance(net, DictConfig) else dict(net)
        class_names = list(class_names)
        # Plain Python values only: checkpoints must load with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "net": net,
                "class_names": class_names,
                "name": name,
                "label_smoothing": label_smoothing,
                "class_weighting": class_weighting,
                "freeze_backbone_epochs": freeze_backbone_epochs,
                "backbone_lr_factor": backbone_lr_factor,
                "channels_last": channels_last,
                "compile": compile,
                "monitor": monitor,
                "preprocessing": OmegaConf.to_container(preprocessing)
                if isinstance(preprocessing, DictConfig)
                else preprocessing,
            }
        )
        self.net = instantiate(net, num_classes=len(class_names))
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.register_buffer("class_weights", torch.ones(len(class_names)))
        metrics = classification_metrics(len(class_names))
        for metric in metrics.values():  # computed on predictions already gathered from every rank
            metric.sync_on_compute = False
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.train_accuracy = MulticlassAccuracy(num_classes=len(class_names), average="micro")
        self.val_best = MaxMetric()
        self.val_best.persistent(True)  # in checkpoints: the best-so-far survives a resume
        self._outputs: dict[str, list] = {"val": [], "test": []}
        self.test_results: dict[str, torch.Tensor] = {}

    # ---- the network ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.hparams.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return getattr(self, "_compiled_net", self.net)(x)

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.net.get_classifier().parameters())

    def backbone_parameters(self) -> list[nn.Parameter]:
        head = {id(p) for p in self.head_parameters()}
        return [p for p in self.net.parameters() if id(p) not in head]

    def setup(self, stage: str) -> None:
        if self.hparams.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.hparams.compile and not hasattr(self, "_compiled_net"):
            # Not registered as a submodule: checkpoints keep the plain net's parameter names.
            object.__setattr__(self, "_compiled_net", torch.compile(self.net))
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if stage == "fit" and self.hparams.class_weighting == "balanced" and datamodule is not None:
            counts = datamodule.train_class_counts().to(self.class_weights)
            present = counts > 0
            weights = torch.zeros_like(counts)
            weights[present] = counts.sum() / (present.sum() * counts[present])
            self.class_weights.copy_(weights)

    # ---- training -------------------------------------------------------------------------------
    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weight = self.class_weights if self.hparams.class_weighting == "balanced" else None
        return F.cross_entropy(logits, targets, weight=weight, label_smoothing=self.hparams.label_smoothing)

    @property
    def backbone_is_pretrained(self) -> bool:
        return getattr(self.net, "pretrained_source", "none").startswith(("file:", "hub"))

    def on_train_epoch_start(self) -> None:
        # Freezing only makes sense for learned features: a randomly initialised backbone trains.
        frozen = self.backbone_is_pretrained and self.current_epoch < self.hparams.freeze_backbone_epochs
        for parameter in self.backbone_parameters():
            parameter.requires_grad_(not frozen)
        if frozen:  # frozen BatchNorm statistics too, as in Lightning's BaseFinetuning
            head = {id(m) for m in self.net.get_classifier().modules()}
            for module in self.net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and id(module) not in head:
                    module.eval()

    def training_step(self, batch, batch_idx):
        images, targets = batch
        logits = self(images)
        loss = self._loss(logits, targets)
        self.train_accuracy(logits, targets)
        self.log(
            "train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(targets), sync_dist=True
        )
        self.log("train/accuracy", self.train_accuracy, on_step=False, on_epoch=True, batch_size=len(targets))
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        images, targets = batch
        self._outputs[stage].append((self(images).detach().float(), targets))

    def _stage_outputs(self, stage: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The stage's logits and targets over the whole set, in the loader's order (the table's).

        Under DDP each rank saw part of the set, and ``DistributedSampler`` pads the parts to equal length
        by repeating images: gather every rank's predictions with their dataset indices and keep each image
        once, so that metrics equal a single process's on the same weights."""
        logits = torch.cat([o[0] for o in self._outputs[stage]])
        targets = torch.cat([o[1] for o in self._outputs[stage]])
        self._outputs[stage] = []
        if self.trainer.world_size == 1:
            return logits, targets
        loader = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        indices = torch.as_tensor(list(iter(loader.sampler))[: len(targets)], device=targets.device)
        logits, targets, indices = (self.all_gather(t).flatten(0, 1) for t in (logits, targets, indices))
        indices, order = torch.sort(indices, stable=True)
        first = torch.ones_like(indices, dtype=torch.bool)
        first[1:] = indices[1:] != indices[:-1]
        return logits[order][first], targets[order][first]

    def _log_stage(self, stage: str, metrics: MetricCollection) -> dict[str, torch.Tensor]:
        logits, targets = self._stage_outputs(stage)
        metrics.update(logits.softmax(dim=1), targets)
        values = metrics.compute()
        metrics.reset()
        values[f"{stage}/loss"] = self._loss(logits, targets)
        # The same numbers on every rank (gathered): sync_dist only keeps Lightning's bookkeeping uniform.
        self.log_dict({k: v for k, v in values.items() if k != f"{stage}/f1_macro"}, sync_dist=True)
        self.log(f"{stage}/f1_macro", values[f"{stage}/f1_macro"], prog_bar=True, sync_dist=True)
        return {"logits": logits, "targets": targets, "values": values}

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        values = self._log_stage("val", self.val_metrics)["values"]
        if self.trainer.sanity_checking:  # not a best score: and a resumed run must keep its restored one
            return
        self.val_best(values[self.hparams.monitor])
        self.log(f"{self.hparams.monitor}_best", self.val_best.compute(), prog_bar=True, sync_dist=True)

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        outputs = self._log_stage("test", self.test_metrics)
        self.test_results = {"probs": outputs["logits"].softmax(dim=1).cpu(), "targets": outputs["targets"].cpu()}

    @torch.no_grad()
    def predict_proba(self, loader) -> tuple[torch.Tensor, torch.Tensor]:
        """Class probabilities and targets for every batch of ``loader``, in eval mode."""
        self.eval()
        probs, targets = [], []
        for images, target in loader:
            probs.append(self(images.to(self.device)).float().softmax(dim=1).cpu())
            targets.append(torch.as_tensor(target))
        return torch.cat(probs), torch.cat(targets)

    def report(self, trainer, datamodule, run_dir: Path, options) -> Report:
        """The task's end-of-run report: test the best checkpoint, write the classification report."""
        from fetalbrain.evaluation.report import classification_report  # plots and sklearn: not for inference

        return classification_report(self, trainer, datamodule, run_dir, options)

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("no optimizer given: compose the config with an optimizer group")
        factor = self.hparams.backbone_lr_factor
        params = self.parameters()
        if factor != 1.0:
            lr = self.optimizer_factory.keywords["lr"]
            params = [{"params": self.backbone_parameters(), "lr": lr * factor}, {"params": self.head_parameters()}]
        optimizer = self.optimizer_factory(params=params)
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss"}}


def load_classifier(checkpoint: str | Path | dict) -> Classifier:
    """Rebuild a trained classifier from its checkpoint alone (a path, or its already-read contents)."""
    state = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    hparams = dict(state.get("hyper_parameters") or {})
    if "net" not in hparams or "class_names" not in hparams:
        source = "" if isinstance(checkpoint, dict) else f"{checkpoint}: "
        kind = "a WGAN-GP generator" if "latent_dim" in hparams else "not a fetalbrain classifier"
        raise ValueError(f"{source}{kind} checkpoint; pass the checkpoint of a classification run")
    net = dict(hparams.pop("net"))
    net.update({k: v for k, v in (("pretrained", False), ("weights", None)) if k in net})
    model = Classifier(net=net, **hparams)
    model.load_state_dict(state["state_dict"])
    return model.eval()
