"""Class-conditional WGAN-GP (Gulrajani et al. 2017) for 1-channel ultrasound images.

The generator is conditioned through class-conditional batch norm, the critic through a projection head
(Miyato & Koyama 2018). Training is one critic step per batch and one generator step every ``n_critic``
critic steps; an EMA of the generator's weights draws every sample that leaves the module.

For small data (about 1,100 training images here) the critic sees real and fake images only through the same
differentiable augmentation (``diffaugment``, Zhao et al. 2020), and an R1 penalty on real images (``r1_gamma``,
Mescheder et al. 2018) can stand beside, or instead of, the gradient penalty.
"""

import math
from functools import partial
from pathlib import Path

import lightning as L
import matplotlib
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torch.optim.swa_utils import AveragedModel

from fetalbrain.data.classes import display_name
from fetalbrain.models.diffaugment import DiffAugment
from fetalbrain.project import plain
from fetalbrain.runs.checkpoints import read_checkpoint
from fetalbrain.runs.layout import Report

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TRAIN_IMAGES_FILE = "train_images.csv"  # the real images a generator saw: generate copies it, mixes check it
QUALITY_CURVE_CSV = "quality_curve.csv"  # quality against compute (callbacks.generator_quality), in the run folder
QUALITY_CURVE_PNG = "quality_curve.png"


class GANDivergedError(RuntimeError):
    """A loss left the finite, bounded range: the weights are no longer worth training on."""


def check_image_size(image_size: int) -> int:
    """The networks double/halve resolution from 4×4, so the size must be a power of two."""
    if not (isinstance(image_size, int) and 32 <= image_size <= 256 and image_size & (image_size - 1) == 0):
        raise ValueError(f"data.image_size={image_size!r}: the WGAN-GP needs a power of two in [32, 256]")
    return image_size


def _widths(width: int, image_size: int) -> list[int]:
    """Channels per resolution from 4×4 up to ``image_size``: width × 8 at most, ``width`` at full size."""
    levels = int(math.log2(image_size)) - 2
    return [width * min(8, 2 ** (levels - i)) for i in range(levels + 1)]


# ---- networks ------------------------------------------------------------------------------------
class ConditionalBatchNorm2d(nn.Module):
    """Batch norm whose scale and shift are looked up per class: conditioning at every resolution."""

    def __init__(self, num_features: int, num_classes: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(num_features, affine=False)
        self.affine = nn.Embedding(num_classes, 2 * num_features)
        nn.init.ones_(self.affine.weight[:, :num_features])
        nn.init.zeros_(self.affine.weight[:, num_features:])

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.affine(labels).chunk(2, dim=1)
        return self.norm(x) * gamma[:, :, None, None] + beta[:, :, None, None]


class UpBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm = ConditionalBatchNorm2d(out_channels, num_classes)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        return F.relu(self.norm(x, labels))


class Generator(nn.Module):
    """z (N, latent_dim) and labels (N,) → images (N, 1, S, S) in [-1, 1].

    Class conditioning by conditional batch norm (per-class scale and shift after the projection and
    after every upsampling conv), not by concatenating an embedding to z: the class reaches every layer.
    """

    def __init__(self, num_classes: int, latent_dim: int = 128, width: int = 64, image_size: int = 64):
        super().__init__()
        widths = _widths(width, check_image_size(image_size))
        self.latent_dim = latent_dim
        self.project = nn.Linear(latent_dim, widths[0] * 16, bias=False)
        self.project_norm = ConditionalBatchNorm2d(widths[0], num_classes)
        self.blocks = nn.ModuleList(UpBlock(a, b, num_classes) for a, b in zip(widths[:-1], widths[1:]))
        self.to_image = nn.Conv2d(widths[-1], 1, 3, padding=1)

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(len(z), -1, 4, 4)
        h = F.relu(self.project_norm(h, labels))
        for block in self.blocks:
            h = block(h, labels)
        return torch.tanh(self.to_image(h))


class Critic(nn.Module):
    """Images and labels → one unbounded score per image (N,).

    No batch norm: the gradient penalty is per sample, and batch statistics would couple samples.
    Layer norm (GroupNorm with one group) keeps the deep blocks well scaled.
    """

    def __init__(self, num_classes: int, width: int = 64, image_size: int = 64):
        super().__init__()
        widths = _widths(width, check_image_size(image_size))[::-1]  # full resolution first
        layers: list[nn.Module] = [nn.Conv2d(1, widths[0], 3, padding=1), nn.LeakyReLU(0.2)]
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(a, b, 4, stride=2, padding=1), nn.GroupNorm(1, b), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(widths[-1], 1)
        self.embed = nn.Embedding(num_classes, widths[-1])
        nn.init.normal_(self.embed.weight, std=0.02)

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.features(x).mean(dim=(2, 3))
        return self.linear(h).squeeze(1) + (self.embed(labels) * h).sum(dim=1)  # projection head


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean((‖∇D(x̂)‖₂ − 1)²) on random interpolates x̂ = ε·real + (1−ε)·fake, one ε per sample.

    Computed in fp32 outside autocast: the double backward through a bf16 graph loses the precision
    the penalty measures (and some bf16 kernels have no double backward).
    """
    with torch.autocast(device_type=real.device.type, enabled=False):
        real, fake = real.detach().float(), fake.detach().float()
        epsilon = torch.rand(len(real), *([1] * (real.ndim - 1)), device=real.device)
        interpolates = (epsilon * real + (1 - epsilon) * fake).requires_grad_(True)
        scores = critic(interpolates, labels).float()
        (gradients,) = torch.autograd.grad(scores.sum(), interpolates, create_graph=True)
        norms = torch.sqrt(gradients.flatten(1).pow(2).sum(dim=1) + 1e-12)  # finite gradient at ∇ = 0
        return ((norms - 1) ** 2).mean()


def r1_penalty(critic: nn.Module, real: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """mean(‖∇D(x)‖₂²) on the (augmented) real images: keeps the critic flat where the data lie, which stops it
    from sharpening around the few training images it has memorised. fp32 outside autocast, as the GP."""
    with torch.autocast(device_type=real.device.type, enabled=False):
        real = real.detach().float().requires_grad_(True)
        (gradients,) = torch.autograd.grad(critic(real, labels).float().sum(), real, create_graph=True)
        return gradients.flatten(1).pow(2).sum(dim=1).mean()


def ema_with_warmup(decay: float):
    """An AveragedModel ``multi_avg_fn``: EMA whose decay ramps up as min(decay, (1 + n) / (10 + n)).

    A fixed 0.999 would keep 0.999^k of the random initial weights after k generator steps (74 % after
    300, 37 % after 1000): short runs would sample from mostly untrained weights. Integer buffers (batch
    norm's counters) take the current value.
    """

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        n = float(num_averaged)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, weight)
        else:
            torch._foreach_copy_(averaged, current)

    return update


def _scalar(value) -> float:
    """A 1-channel normalisation constant, given as a number or a one-element list."""
    values = np.ravel(np.asarray(value, dtype=float))
    if values.size != 1:
        raise ValueError(f"data.mean/data.std={value!r}: the WGAN-GP takes 1-channel statistics")
    return float(values[0])


# ---- the LightningModule -------------------------------------------------------------------------
class ConditionalWGANGP(L.LightningModule):
    task = "generation"  # the run summary's task: runs.find_runs/latest_checkpoint select generators by it

    def __init__(
        self,
        class_names: list[str],
        preprocessing: dict,
        optimizer: partial | None = None,
        scheduler: partial | None = None,
        name: str = "wgan_gp",
        latent_dim: int = 128,
        generator_width: int = 64,
        critic_width: int = 64,
        gp_lambda: float = 10.0,
        r1_gamma: float = 0.0,
        diffaugment: list[str] | str | None = None,
        n_critic: int = 5,
        critic_lr_factor: float = 1.0,
        ema_decay: float = 0.999,
        sample_every_n_epochs: int = 5,
        samples_per_class: int = 8,
        max_critic_loss: float = 1e4,
        monitor: str | None = None,
    ):
        super().__init__()
        if scheduler is not None:
            raise ValueError("model=wgan_gp uses no learning-rate scheduler: set scheduler=none")
        preprocessing = dict(plain(preprocessing))
        if preprocessing.get("channels") != 1:
            raise ValueError(f"data.channels={preprocessing.get('channels')!r}: the WGAN-GP generates 1-channel images")
        if n_critic < 1:
            raise ValueError(f"model.n_critic={n_critic}: needs at least one critic step per generator step")
        if gp_lambda < 0 or r1_gamma < 0 or gp_lambda == r1_gamma == 0:
            raise ValueError(
                f"model.gp_lambda={gp_lambda}, model.r1_gamma={r1_gamma}: both must be >= 0 and one > 0 "
                "(an unregularised Wasserstein critic is unbounded)"
            )
        augment = DiffAugment(diffaugment)  # checks the policy's names here, before anything trains
        class_names = list(plain(class_names))
        image_size = check_image_size(preprocessing.get("image_size"))
        self.save_hyperparameters(
            {
                "class_names": class_names,
                "preprocessing": preprocessing,
                "name": name,
                "latent_dim": latent_dim,
                "generator_width": generator_width,
                "critic_width": critic_width,
                "gp_lambda": gp_lambda,
                "r1_gamma": r1_gamma,
                "diffaugment": list(augment.policy),
                "n_critic": n_critic,
                "critic_lr_factor": critic_lr_factor,
                "ema_decay": ema_decay,
                "sample_every_n_epochs": sample_every_n_epochs,
                "samples_per_class": samples_per_class,
                "max_critic_loss": max_critic_loss,
                "monitor": monitor,
            }
        )
        self.automatic_optimization = False
        self.optimizer_factory = optimizer
        self.pixel_mean, self.pixel_std = _scalar(preprocessing["mean"]), _scalar(preprocessing["std"])
        num_classes = len(class_names)
        self.generator = Generator(num_classes, latent_dim, generator_width, image_size)
        self.critic = Critic(num_classes, critic_width, image_size)
        self.augment = augment  # before the critic, on real and fake alike
        # A submodule, so the checkpoint carries the averaged weights that sampling uses.
        self.ema = AveragedModel(self.generator, multi_avg_fn=ema_with_warmup(ema_decay), use_buffers=True)
        self.ema.requires_grad_(False)
        noise = torch.randn(num_classes * samples_per_class, latent_dim, generator=torch.Generator().manual_seed(0))
        self.register_buffer("fixed_noise", noise)  # the same faces every epoch: progress is comparable
        self.critic_steps = 0
        self.generator_steps = 0

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.generator(z, labels)

    def to_unit_range(self, images: torch.Tensor) -> torch.Tensor:
        """The DataModule's normalised images, back to the generator's [-1, 1]."""
        return (images.float() * self.pixel_std + self.pixel_mean) * 2 - 1

    # ---- training -------------------------------------------------------------------------------
    def _check(self, which: str, loss: torch.Tensor) -> None:
        value = float(loss.detach())
        limit = self.hparams.max_critic_loss
        if math.isfinite(value) and (which == "generator" or abs(value) <= limit):
            return
        bound = "" if not math.isfinite(value) else f" (|loss| > model.max_critic_loss={limit:g})"
        raise GANDivergedError(
            f"WGAN-GP diverged at epoch {self.current_epoch}, step {self.global_step} "
            f"(critic step {self.critic_steps}, generator step {self.generator_steps}): "
            f"{which} loss = {value:g}{bound}. No optimizer stepped with it; the checkpoints saved so far "
            "(the last good ones) are kept. Retry with a lower optimizer.lr or a higher model.gp_lambda."
        )

    def training_step(self, batch, batch_idx):
        images, labels = batch
        real, labels = self.to_unit_range(images), labels.long()
        opt_generator, opt_critic = self.optimizers()
        size = len(real)
        hp = self.hparams

        self.toggle_optimizer(opt_critic)
        with torch.no_grad():
            fake = self.generator(torch.randn(size, hp.latent_dim, device=self.device), labels)
        real_seen, fake_seen = self.augment(real), self.augment(fake)  # each its own random draw
        wasserstein = self.critic(real_seen, labels).float().mean() - self.critic(fake_seen, labels).float().mean()
        critic_loss = -wasserstein
        penalty = r1 = torch.zeros((), device=self.device)
        if hp.gp_lambda != 0:
            penalty = gradient_penalty(self.critic, real_seen, fake_seen, labels)
            critic_loss = critic_loss + hp.gp_lambda * penalty
        if hp.r1_gamma > 0:
            r1 = r1_penalty(self.critic, real_seen, labels)
            critic_loss = critic_loss + hp.r1_gamma / 2 * r1
        self._check("critic", critic_loss)
        opt_critic.zero_grad()
        self.manual_backward(critic_loss)
        opt_critic.step()
        self.untoggle_optimizer(opt_critic)
        self.critic_steps += 1
        log = dict(on_step=False, on_epoch=True, batch_size=size)
        self.log("train/critic_loss", critic_loss.detach(), prog_bar=True, **log)
        self.log("train/gradient_penalty", penalty.detach(), **log)
        if hp.r1_gamma > 0:
            self.log("train/r1_penalty", r1.detach(), **log)
        self.log("train/wasserstein", wasserstein.detach(), prog_bar=True, **log)

        if self.critic_steps % hp.n_critic == 0:
            self.toggle_optimizer(opt_generator)
            fake = self.generator(torch.randn(size, hp.latent_dim, device=self.device), labels)
            generator_loss = -self.critic(self.augment(fake), labels).float().mean()  # gradients pass through
            self._check("generator", generator_loss)
            opt_generator.zero_grad()
            self.manual_backward(generator_loss)
            opt_generator.step()
            self.untoggle_optimizer(opt_generator)
            self.generator_steps += 1
            self.ema.update_parameters(self.generator)
            self.log("train/generator_loss", generator_loss.detach(), **log)

    def configure_optimizers(self):
        if self.optimizer_factory is None:
            raise ValueError("no optimizer given: compose the config with an optimizer group")
        factor = self.hparams.critic_lr_factor
        critic_options = {}
        if factor != 1.0:
            if "lr" not in self.optimizer_factory.keywords:
                raise ValueError("model.critic_lr_factor needs optimizer.lr to be set explicitly")
            critic_options["lr"] = self.optimizer_factory.keywords["lr"] * factor
        generator = self.optimizer_factory(params=self.generator.parameters())
        critic = self.optimizer_factory(params=self.critic.parameters(), **critic_options)
        return [generator, critic]  # the order training_step unpacks

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["gan_steps"] = {"critic": self.critic_steps, "generator": self.generator_steps}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        steps = checkpoint.get("gan_steps", {})
        self.critic_steps, self.generator_steps = steps.get("critic", 0), steps.get("generator", 0)

    # ---- samples --------------------------------------------------------------------------------
    @torch.no_grad()
    def ema_images(self, z: torch.Tensor, labels: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """uint8 (N, H, W) from the EMA generator in eval mode, leaving the module's mode as it was."""
        net = self.ema.module
        was_training = net.training
        net.eval()
        size = self.hparams.preprocessing["image_size"]
        out = [torch.zeros(0, size, size, dtype=torch.uint8)]
        try:
            for start in range(0, len(z), batch_size):
                images = net(z[start : start + batch_size].to(self.device), labels[start : start + batch_size])
                out.append(((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].cpu())
        finally:
            net.train(was_training)
        return torch.cat(out).numpy()

    @torch.no_grad()
    def generate(self, labels: torch.Tensor, seed: int, batch_size: int = 64) -> np.ndarray:
        """uint8 images (N, H, W) in 0..255 for ``labels``; the same seed and labels give the same images."""
        self.eval()
        labels = torch.as_tensor(labels, dtype=torch.long).flatten()
        # torch fills normal draws in blocks of 16 and draws short tensors otherwise: a whole number of blocks
        # (at least one) makes the first k images of a seed the same whatever the number asked for.
        count = len(labels) * self.hparams.latent_dim
        values = torch.randn(max(16, -(-count // 16) * 16), generator=torch.Generator().manual_seed(seed))
        noise = values[:count].view(len(labels), self.hparams.latent_dim)
        return self.ema_images(noise, labels.to(self.device), batch_size)

    def sample_grid(self, path: Path, title: str) -> Path:
        """One row per class, ``samples_per_class`` columns, from the fixed noise and the EMA generator."""
        per_class, names = self.hparams.samples_per_class, self.hparams.class_names
        labels = torch.arange(len(names), device=self.device).repeat_interleave(per_class)
        images = self.ema_images(self.fixed_noise, labels)
        size, gap = images.shape[-1], 2
        tiles = images.reshape(len(names), per_class, size, size)
        tiles = np.pad(tiles, ((0, 0), (0, 0), (0, gap), (0, gap)), constant_values=255)  # white gutters
        mosaic = tiles.transpose(0, 2, 1, 3).reshape(len(names) * (size + gap), -1)[:-gap, :-gap]
        fig, ax = plt.subplots(figsize=(per_class * 0.9 + 2.6, len(names) * 0.9 + 0.7))
        ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_yticks([r * (size + gap) + size / 2 for r in range(len(names))], [display_name(n) for n in names])
        ax.set_xticks([])
        ax.tick_params(length=0, labelsize=8)
        ax.set_title(title, fontsize=9)
        for spine in ax.spines.values():
            spine.set_visible(False)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path

    def _log_samples(self, path: Path, key: str = "samples") -> None:
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=key, images=[str(path)])

    def _is_last_epoch(self) -> bool:
        trainer, epoch = self.trainer, self.current_epoch
        max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
        return (
            bool(trainer.should_stop)
            or (max_epochs is not None and max_epochs > 0 and epoch + 1 >= max_epochs)
            or (max_steps is not None and max_steps > 0 and trainer.global_step >= max_steps)
        )

    def on_train_epoch_end(self) -> None:
        every, epoch = self.hparams.sample_every_n_epochs, self.current_epoch
        if not self.trainer.is_global_zero or not ((every > 0 and (epoch + 1) % every == 0) or self._is_last_epoch()):
            return
        path = Path(self.trainer.default_root_dir) / "samples" / f"epoch_{epoch:03d}.png"
        self.sample_grid(path, f"{self.hparams.name}: epoch {epoch}, EMA generator, fixed noise")
        self._log_samples(path)

    # ---- the end-of-run report ------------------------------------------------------------------
    def on_fit_start(self) -> None:
        """Refuse what would make the record of seen images wrong, then write that record before the first
        step: a diverged run's last good checkpoint must still say which images it learnt from."""
        trainer, datamodule = self.trainer, self.trainer.datamodule
        if trainer.world_size > 1:
            raise ValueError(
                f"model=wgan_gp trains on one device (got {trainer.world_size} processes): the gradient penalty's "
                "double backward is fragile under DDP; run several generators (folds) in parallel instead"
            )
        if datamodule is None:
            return  # plain dataloaders (tests, benchmark): no split to record
        if getattr(datamodule, "synthetic", None):
            raise ValueError(
                "model=wgan_gp trains on real images only: set data.mix=real (a generator trained on synthetic "
                "images would hide which real images it learnt from)"
            )
        if trainer.is_global_zero:
            run_dir = Path(trainer.default_root_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            train = datamodule.part_table("train")
            train[["path", "label", "case", "group"]].to_csv(run_dir / TRAIN_IMAGES_FILE, index=False)

    def report(self, trainer, datamodule, run_dir: Path, options=None) -> Report:
        """Final samples, the training images the generator saw, and what its classes were learnt from.

        A generator can only reproduce the variety it was shown: a class from one case yields variants of
        that case, which matters before using its samples as augmentation or for teaching.
        """
        if not trainer.is_global_zero:  # DDP: one report, from rank 0
            return Report({}, [], {})
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        path = self.sample_grid(run_dir / "samples.png", f"{self.hparams.name}: final EMA generator, fixed noise")
        train = datamodule.part_table("train")
        metrics = {"gan/critic_steps": float(self.critic_steps), "gan/generator_steps": float(self.generator_steps)}
        for key in ("wasserstein", "critic_loss", "generator_loss", "gradient_penalty", "r1_penalty"):
            if f"train/{key}" in trainer.callback_metrics:
                metrics[f"gan/{key}"] = float(trainer.callback_metrics[f"train/{key}"])
        figures = {"samples/final": path}
        notes = []
        curve = run_dir / QUALITY_CURVE_CSV
        last = pd.read_csv(curve).iloc[-1] if curve.is_file() else None
        if last is not None and int(last["generator_step"]) == self.generator_steps:  # this generator's last point
            kept = {k: float(v) for k, v in last.items() if k not in ("epoch", "evaluation_seconds")}
            metrics |= {f"quality/{k}": v for k, v in kept.items() if math.isfinite(v)}  # no detector: no OOD column
            figures["quality/curve"] = run_dir / QUALITY_CURVE_PNG
            notes.append(
                f"Quality at generator step {int(last['generator_step'])} ({last['cpu_hours']:.2f} CPU-hours): "
                f"FID {last['fid']:.1f} (real validation {last['reference_fid']:.1f}), k-NN precision "
                f"{last['precision']:.2f} / recall {last['recall']:.2f} (real {last['reference_precision']:.2f} / "
                f"{last['reference_recall']:.2f}), OOD detector accepts {last['ood_acceptance']:.2f}, CAS "
                f"{last['cas']:.2f} (real {last['reference_cas']:.2f})"
            )
        for label in self.hparams.class_names:
            rows = train[train["label"] == label]
            cases, name = rows["case"].nunique(), display_name(label)
            if rows.empty:
                notes.append(f"{name} is absent from the training part: its generator row is untrained")
                continue
            notes.append(f"{name}: learnt from {len(rows)} image(s) of {cases} case(s)")
            if cases == 1:
                notes.append(f"{name} was learnt from a single case: its samples can only vary that case")
        return Report(metrics, notes, figures=figures)  # the entry point logs the figures


def load_gan(checkpoint: str | Path | dict) -> ConditionalWGANGP:
    """Rebuild a trained WGAN-GP from its checkpoint alone (a path, or its already-read contents)."""
    state = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    hparams = dict(state.get("hyper_parameters") or {})
    if "latent_dim" not in hparams or "net" in hparams:
        kind = "a classifier checkpoint" if "net" in hparams else "no GAN hyper-parameters"
        source = "" if isinstance(checkpoint, dict) else f"ckpt={checkpoint}: "
        raise ValueError(
            f"{source}not a WGAN-GP checkpoint ({kind}): pass a checkpoint of a model=wgan_gp run "
            "(its checkpoints/last.ckpt)"
        )
    model = ConditionalWGANGP(**hparams)
    model.load_state_dict(state["state_dict"])
    model.on_load_checkpoint(state)
    return model.eval()
