"""The one LightningModule for classification: any net, per-stage metric collections, and the training levers
for small imbalanced data: the loss (``fetalbrain.models.losses``), mixup/cutmix, staged unfreezing, a lower
learning rate for the backbone and layer-wise decay, warm-up, and test-time augmentation."""

import logging
from functools import partial
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torchmetrics import MaxMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from fetalbrain.data.tta import check_tta, with_tta
from fetalbrain.evaluation.metrics import classification_metrics
from fetalbrain.models.losses import check_loss_options, class_weights, classification_loss, log_prior
from fetalbrain.runs.checkpoints import read_checkpoint
from fetalbrain.runs.layout import Report

log = logging.getLogger(__name__)


def cosine_with_warmup(
    optimizer: torch.optim.Optimizer,
    T_max: int,
    eta_min: float = 0.0,
    warmup_epochs: int = 0,
    warmup_start_factor: float = 0.01,
) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine annealing to ``eta_min`` at epoch ``T_max`` after ``warmup_epochs`` (``scheduler.warmup_epochs``)
    of linear warm-up from ``warmup_start_factor`` x each group's learning rate: a new head's large early gradients
    do not wreck pretrained features. Without warm-up, exactly torch's CosineAnnealingLR."""
    if not 0 <= warmup_epochs < T_max:
        raise ValueError(
            f"scheduler.warmup_epochs={warmup_epochs}: must be >= 0 and below scheduler.T_max={T_max} "
            "(trainer.max_epochs by default)"
        )
    if not 0.0 < warmup_start_factor <= 1.0:
        raise ValueError(f"scheduler.warmup_start_factor={warmup_start_factor}: must be in (0, 1]")
    if warmup_epochs == 0:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=T_max, eta_min=eta_min)
    warmup = torch.optim.lr_scheduler.LinearLR(optimizer, warmup_start_factor, 1.0, total_iters=warmup_epochs)
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=T_max - warmup_epochs, eta_min=eta_min)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, cosine], milestones=[warmup_epochs])


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
        loss: str = "cross_entropy",
        focal_gamma: float = 2.0,
        logit_adjustment_tau: float = 1.0,
        class_balance_beta: float = 0.999,
        layer_decay: float | None = None,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mix_prob: float = 1.0,
        mix_switch_prob: float = 0.5,
        tta: str = "none",
    ):
        super().__init__()
        check_loss_options(
            loss, class_weighting, label_smoothing, focal_gamma, class_balance_beta, logit_adjustment_tau
        )
        if layer_decay is not None and not 0.0 < layer_decay <= 1.0:
            raise ValueError(f"model.layer_decay={layer_decay}: must be in (0, 1], or null for none")
        for key, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if value < 0:
                raise ValueError(f"model.{key}={value}: must be >= 0 (0: off)")
        for key, value in (("mix_prob", mix_prob), ("mix_switch_prob", mix_switch_prob)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"model.{key}={value}: must be between 0 and 1")
        check_tta(tta)  # a bad model.tta fails here, not at test time
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
                "loss": loss,
                "focal_gamma": focal_gamma,
                "logit_adjustment_tau": logit_adjustment_tau,
                "class_balance_beta": class_balance_beta,
                "layer_decay": layer_decay,
                "mixup_alpha": mixup_alpha,
                "cutmix_alpha": cutmix_alpha,
                "mix_prob": mix_prob,
                "mix_switch_prob": mix_switch_prob,
                "tta": tta,
            }
        )
        self.net = instantiate(net, num_classes=len(class_names))
        if layer_decay is not None and not hasattr(self.net, "group_matcher"):  # here, not at optimizer set-up
            raise ValueError(
                f"model.layer_decay={layer_decay}: {type(self.net).__name__} has no layer groups; layer-wise decay "
                "needs a timm backbone (model=efficientnet_lite0, xception, timm, ...) or model.layer_decay=null"
            )
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.register_buffer("class_weights", torch.ones(len(class_names)))  # model.class_weighting
        # The training part's log class frequencies (model.loss=logit_adjusted): computed from the data at every
        # fit, so not in checkpoints (whose keys stay those of runs from before this loss existed).
        self.register_buffer("class_log_prior", torch.zeros(len(class_names)), persistent=False)
        self.mixup = None
        if (mixup_alpha > 0 or cutmix_alpha > 0) and mix_prob > 0:
            from timm.data import Mixup

            # Targets mixed without smoothing: the loss smooths every target alike (model.label_smoothing).
            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                prob=mix_prob,
                switch_prob=mix_switch_prob,
                label_smoothing=0.0,
                num_classes=len(class_names),
            )
        metrics = classification_metrics(len(class_names))
        for metric in metrics.values():  # computed on predictions already gathered from every rank
            metric.sync_on_compute = False
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.train_accuracy = MulticlassAccuracy(num_classes=len(class_names), average="micro")
        self.train_f1 = MulticlassF1Score(num_classes=len(class_names), average="macro")  # training curves' F1
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
        hp = self.hparams
        if stage != "fit" or (hp.class_weighting == "none" and hp.loss != "logit_adjusted"):
            return
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        if datamodule is None:
            raise ValueError(
                f"model.class_weighting={hp.class_weighting} / model.loss={hp.loss} need the training part's class "
                "counts: fit with a datamodule (datamodule.train_class_counts())"
            )
        counts = datamodule.train_class_counts()
        self.class_weights.copy_(class_weights(counts, hp.class_weighting, hp.class_balance_beta))
        self.class_log_prior.copy_(log_prior(counts))
        if datamodule.hparams.get("sampler") == "weighted":
            log.warning(
                "data.sampler=weighted already balances the classes; with model.class_weighting=%s and "
                "model.loss=%s the rare classes are favoured twice",
                hp.class_weighting,
                hp.loss,
            )

    # ---- training -------------------------------------------------------------------------------
    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``targets``: class indices, or class probabilities (mixup/cutmix)."""
        hp = self.hparams
        return classification_loss(
            logits,
            targets,
            loss=hp.loss,
            weight=self.class_weights if hp.class_weighting != "none" else None,
            label_smoothing=hp.label_smoothing,
            focal_gamma=hp.focal_gamma,
            prior=self.class_log_prior,
            tau=hp.logit_adjustment_tau,
        )

    def _mix(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mixup/cutmix (timm's ``Mixup``, one lambda per batch, each image with its mirror in the batch order):
        mixed images and their class-probability targets. timm mixes pairs, so an odd last image stays itself."""
        even = len(images) - len(images) % 2
        if self.mixup is None or even == 0:
            return images, targets
        mixed, soft = self.mixup(images[:even].clone(), targets[:even])
        rest = F.one_hot(targets[even:], len(self.hparams.class_names)).to(soft)
        return torch.cat([mixed, images[even:]]), torch.cat([soft, rest])

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
        mixed, mixed_targets = self._mix(images, targets)
        logits = self(mixed)
        loss = self._loss(logits, mixed_targets)
        # Against the larger part of each (mixed) target: lambda ~ Beta(a, a) is symmetric, so under mixup an image's
        # own class is the smaller part half the time.
        hard_targets = mixed_targets.argmax(dim=1) if mixed_targets.ndim == 2 else targets
        self.train_accuracy(logits, hard_targets)
        self.train_f1(logits, hard_targets)
        self.log(
            "train/loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=len(targets), sync_dist=True
        )
        self.log("train/accuracy", self.train_accuracy, on_step=False, on_epoch=True, batch_size=len(targets))
        self.log("train/f1_macro", self.train_f1, on_step=False, on_epoch=True, batch_size=len(targets))
        return loss

    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """The logits of test and prediction: with ``model.tta``, of the views' averaged probabilities
        (``mean_probability_logits``). Validation during training (model selection) uses the plain forward."""
        return with_tta(self, images, self(images), self.hparams.tta)

    def _evaluate(self, batch, stage: str) -> None:
        images, targets = batch
        logits = self.predict_logits(images) if stage == "test" else self(images)
        self._outputs[stage].append((logits.detach().float(), targets))

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
        """Class probabilities (with ``model.tta``, as in test) and targets for every batch of ``loader``, in eval
        mode: the report fits temperature scaling on validation's, so that it calibrates what test gives."""
        self.eval()
        probs, targets = [], []
        for images, target in loader:
            probs.append(self.predict_logits(images.to(self.device)).float().softmax(dim=1).cpu())
            targets.append(torch.as_tensor(target))
        return torch.cat(probs), torch.cat(targets)

    def report(self, trainer, datamodule, run_dir: Path, options) -> Report:
        """The task's end-of-run report: test the best checkpoint, write the classification report."""
        from fetalbrain.evaluation.test_report import classification_report  # plots and sklearn: not for inference

        return classification_report(self, trainer, datamodule, run_dir, options)

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("no optimizer given: compose the config with an optimizer group")
        optimizer = self.optimizer_factory(params=self.parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        warmup = getattr(self.scheduler_factory, "keywords", {}).get("warmup_epochs", 0)
        freeze = self.hparams.freeze_backbone_epochs if self.backbone_is_pretrained else 0
        if 0 < warmup <= freeze:
            raise ValueError(
                f"scheduler.warmup_epochs={warmup} <= model.freeze_backbone_epochs={freeze}: the warm-up would end "
                "while the backbone is frozen, and the backbone would then start at the full learning rate; set "
                "warmup_epochs above freeze_backbone_epochs, or model.freeze_backbone_epochs=0"
            )
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "monitor": "val/loss"}}

    def parameter_groups(self) -> list[dict] | list[nn.Parameter]:
        """Learning rate per parameter: ``optimizer.lr`` x ``model.backbone_lr_factor`` (backbone, not head) x
        ``model.layer_decay`` ** (its layer's distance from the head), layers as timm groups them
        (``timm.optim.param_groups_layer_decay``: stem, each block, head). Weight decay stays the optimizer's."""
        factor, decay = self.hparams.backbone_lr_factor, self.hparams.layer_decay
        if decay is None and factor == 1.0:
            return list(self.parameters())
        lr = self.optimizer_factory.keywords["lr"]
        if decay is None:
            return [{"params": self.backbone_parameters(), "lr": lr * factor}, {"params": self.head_parameters()}]
        from timm.optim import param_groups_layer_decay

        head = {id(p) for p in self.head_parameters()}
        groups = []
        for group in param_groups_layer_decay(self.net, layer_decay=decay, weight_decay_exclude_1d=False):
            for in_head, scale in ((True, 1.0), (False, factor)):
                params = [p for p in group["params"] if (id(p) in head) == in_head]
                if params:
                    groups.append({"params": params, "lr": lr * group["lr_scale"] * scale})
        if sum(len(g["params"]) for g in groups) != len(list(self.parameters())):  # timm skips frozen parameters
            raise RuntimeError("model.layer_decay: frozen parameters at optimizer set-up; every one must be trained")
        return groups


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
