"""The class-conditional WGAN-GP: penalty maths, the n_critic schedule, bf16, divergence, sampling, checkpoints."""

import math
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fetalbrain.models.diffaugment import OPERATIONS, DiffAugment, cutout, resolve_policy, translation
from fetalbrain.models.gan import (
    ConditionalWGANGP,
    Critic,
    GANDivergedError,
    Generator,
    ema_with_warmup,
    gradient_penalty,
    load_gan,
    r1_penalty,
)

CLASSES = ["normal", "arachnoid-cyst", "encephalocele"]
PREPROCESSING = {"image_size": 32, "channels": 1, "mean": 0.4, "std": 0.25, "denoise": "none", "clahe": False}
ADAM = partial(torch.optim.Adam, lr=1e-4, betas=(0.0, 0.9))


def tiny_gan(**overrides) -> ConditionalWGANGP:
    options = dict(latent_dim=16, generator_width=8, critic_width=8, n_critic=2, samples_per_class=3)
    return ConditionalWGANGP(CLASSES, PREPROCESSING, optimizer=ADAM, **{**options, **overrides})


def loader(batches: int, batch_size: int = 8, seed: int = 0) -> DataLoader:
    """Random images in [0, 1], normalised as the DataModule does, with every class present."""
    generator = torch.Generator().manual_seed(seed)
    count = batches * batch_size
    images = (torch.rand(count, 1, 32, 32, generator=generator) - PREPROCESSING["mean"]) / PREPROCESSING["std"]
    return DataLoader(TensorDataset(images, torch.arange(count) % len(CLASSES)), batch_size=batch_size)


def fit(model, tmp_path, batches: int, **trainer_options) -> L.Trainer:
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **trainer_options,
    )
    trainer.fit(model, train_dataloaders=loader(batches))
    return trainer


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny fit shared by the tests that need trained weights: 6 batches, n_critic = 2."""
    tmp_path = tmp_path_factory.mktemp("gan_run")
    L.seed_everything(0)
    model = tiny_gan()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = fit(model, tmp_path, batches=6)
    return SimpleNamespace(model=model, trainer=trainer, before=before, run_dir=tmp_path)


# ---- the penalty ---------------------------------------------------------------------------------
class LinearCritic(nn.Module):
    """D(x, y) = <w, x> + b_y: the gradient w.r.t. x is w everywhere, so GP = (‖w‖ − 1)²."""

    def __init__(self, w: torch.Tensor, num_classes: int = 3):
        super().__init__()
        self.w = nn.Parameter(w.flatten().clone())
        self.bias = nn.Embedding(num_classes, 1)

    def forward(self, x, labels):
        return x.flatten(1) @ self.w + self.bias(labels).squeeze(1)


def test_gradient_penalty_matches_its_analytic_value_for_a_linear_critic():
    w = torch.zeros(1, 4, 4)
    w[0, 0, :2] = torch.tensor([3.0, 4.0])  # ‖w‖ = 5 → GP = 16
    critic = LinearCritic(w)
    real, fake = torch.randn(6, 1, 4, 4), torch.randn(6, 1, 4, 4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    penalty = gradient_penalty(critic, real, fake, labels)
    assert penalty.item() == pytest.approx(16.0, rel=1e-5)
    penalty.backward()  # the double backward reaches the critic's weights: d/dw (‖w‖−1)² = 2(‖w‖−1) w/‖w‖
    assert torch.allclose(critic.w.grad, 2 * (5 - 1) * critic.w.detach() / 5, atol=1e-4)

    unit = LinearCritic(w / 5)
    assert gradient_penalty(unit, real, fake, labels).item() == pytest.approx(0.0, abs=1e-8)


def test_r1_penalty_matches_its_analytic_value_for_a_linear_critic():
    w = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(2))
    real = torch.randn(5, 1, 4, 4)
    assert r1_penalty(LinearCritic(w), real, torch.zeros(5, dtype=torch.long)).item() == pytest.approx(
        w.pow(2).sum().item(), rel=1e-5
    )


def test_gradient_penalty_runs_in_fp32_under_bf16_autocast():
    critic = Critic(num_classes=3, width=8, image_size=32)
    real, fake = torch.rand(4, 1, 32, 32) * 2 - 1, (torch.rand(4, 1, 32, 32) * 2 - 1).bfloat16()
    labels = torch.arange(4) % 3
    torch.manual_seed(0)  # the interpolation weights
    reference = gradient_penalty(critic, real, fake.float(), labels)  # fp32, no autocast
    torch.manual_seed(0)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        assert critic.features[0](real).dtype == torch.bfloat16  # autocast is really on
        penalty = gradient_penalty(critic, real, fake, labels)
    assert penalty.dtype == torch.float32 and torch.isfinite(penalty)
    # In bf16 the critic's gradients would be off by ~1e-2; computed outside autocast they match fp32.
    assert penalty.item() == pytest.approx(reference.item(), rel=1e-5)
    penalty.backward()
    assert all(torch.isfinite(p.grad).all() for p in critic.parameters() if p.grad is not None)


# ---- the networks and the configuration checks ---------------------------------------------------
@pytest.mark.parametrize("size", [32, 64])
def test_networks_shapes_and_range(size):
    generator = Generator(num_classes=4, latent_dim=16, width=8, image_size=size)
    images = generator(torch.randn(5, 16), torch.tensor([0, 1, 2, 3, 0]))
    assert images.shape == (5, 1, size, size) and images.abs().max() <= 1
    critic = Critic(num_classes=4, width=8, image_size=size)
    assert critic(images, torch.tensor([0, 1, 2, 3, 0])).shape == (5,)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in critic.modules())


@pytest.mark.parametrize("size", [48, 16, 512])
def test_bad_image_size_names_the_key(size):
    with pytest.raises(ValueError, match="data.image_size"):
        Generator(3, image_size=size)
    with pytest.raises(ValueError, match="data.image_size"):
        ConditionalWGANGP(CLASSES, {**PREPROCESSING, "image_size": size}, optimizer=ADAM)


def test_bad_configuration_is_refused():
    with pytest.raises(ValueError, match="data.channels"):
        ConditionalWGANGP(CLASSES, {**PREPROCESSING, "channels": 3}, optimizer=ADAM)
    with pytest.raises(ValueError, match="set scheduler=none"):
        ConditionalWGANGP(CLASSES, PREPROCESSING, optimizer=ADAM, scheduler=partial(torch.optim.lr_scheduler.StepLR))
    with pytest.raises(ValueError, match="no optimizer"):
        ConditionalWGANGP(CLASSES, PREPROCESSING).configure_optimizers()


def test_regularisers_and_augmentation_policy_are_checked_by_key():
    with pytest.raises(ValueError, match="model.gp_lambda=0.0, model.r1_gamma=0.0"):
        tiny_gan(gp_lambda=0.0)
    with pytest.raises(ValueError, match="model.diffaugment: unknown operation 'rotate'.*translation"):
        tiny_gan(diffaugment=["translation", "rotate"])
    assert resolve_policy("color,translation") == ("brightness", "contrast", "translation")
    assert resolve_policy(None) == resolve_policy([]) == ()
    assert tiny_gan(diffaugment="cutout").hparams.diffaugment == ["cutout"]


def test_critic_learning_rate_factor():
    generator, critic = tiny_gan(critic_lr_factor=4.0).configure_optimizers()
    assert generator.param_groups[0]["lr"] == 1e-4 and critic.param_groups[0]["lr"] == pytest.approx(4e-4)
    assert generator.param_groups[0]["betas"] == (0.0, 0.9)


def test_batches_are_mapped_back_to_the_generator_range():
    model = tiny_gan()
    x01 = torch.tensor([0.0, 0.4, 1.0])
    normalised = (x01 - PREPROCESSING["mean"]) / PREPROCESSING["std"]
    assert torch.allclose(model.to_unit_range(normalised), torch.tensor([-1.0, -0.2, 1.0]), atol=1e-6)


def test_ema_decay_warms_up_to_its_final_value():
    update = ema_with_warmup(0.999)
    averaged, current, counter = [torch.zeros(3)], [torch.ones(3)], [torch.tensor(5)]
    update(averaged, current, torch.tensor(1))  # decay 2/11: the first updates follow the generator
    assert torch.allclose(averaged[0], torch.full((3,), 9 / 11))
    averaged = [torch.zeros(3)]
    update(averaged, current, torch.tensor(100_000))  # decay capped at 0.999
    assert torch.allclose(averaged[0], torch.full((3,), 1e-3))
    update([counter[0]], [torch.tensor(9)], torch.tensor(3))  # integer buffers are copied
    assert int(counter[0]) == 9


# ---- training ------------------------------------------------------------------------------------
def test_training_steps_the_critic_n_critic_times_per_generator_step(trained):
    model, before = trained.model, trained.before
    assert (model.critic_steps, model.generator_steps) == (6, 3)
    opt_generator, opt_critic = trained.trainer.optimizers
    steps = lambda optimizer: {int(state["step"]) for state in optimizer.state.values()}  # noqa: E731
    assert steps(opt_critic) == {6} and steps(opt_generator) == {3}  # Adam's own count of steps taken
    after = model.state_dict()
    for prefix in ("generator.", "critic.", "ema.module."):
        assert any(not torch.equal(before[k], after[k]) for k in after if k.startswith(prefix)), prefix
    assert int(after["ema.n_averaged"]) == 3  # one EMA update per generator step
    ema_keys = [k for k in after if k.startswith("ema.module.") and after[k].is_floating_point()]
    to_now = sum((after[k] - after[k.replace("ema.module.", "generator.")]).norm() for k in ema_keys)
    to_start = sum((after[k] - before[k.replace("ema.module.", "generator.")]).norm() for k in ema_keys)
    assert to_now < to_start  # the warmed-up EMA follows training, not the initial weights
    metrics = trained.trainer.callback_metrics
    for key in ("train/critic_loss", "train/generator_loss", "train/gradient_penalty", "train/wasserstein"):
        assert math.isfinite(float(metrics[key])), key
    assert (trained.run_dir / "samples" / "epoch_000.png").is_file()  # the last epoch always writes one


def test_schedule_counts_across_batches(tmp_path):
    model = tiny_gan(n_critic=3)
    fit(model, tmp_path, batches=7)
    assert (model.critic_steps, model.generator_steps) == (7, 2)


def test_bf16_mixed_step_is_finite(tmp_path):
    model = tiny_gan(n_critic=1)
    trainer = fit(model, tmp_path, batches=2, precision="bf16-mixed")
    assert (model.critic_steps, model.generator_steps) == (2, 2)
    for key in ("train/critic_loss", "train/generator_loss", "train/gradient_penalty", "train/wasserstein"):
        assert math.isfinite(float(trainer.callback_metrics[key])), key
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"max_critic_loss": 1e-9}, r"diverged at epoch 0, step 0 .*critic loss = .*max_critic_loss=1e-09"),
        ({"gp_lambda": float("nan")}, r"diverged at epoch 0, step 0 .*critic loss = nan"),
    ],
)
def test_divergence_stops_training_without_stepping(tmp_path, overrides, match):
    model = tiny_gan(**overrides)
    critic_before = [p.clone() for p in model.critic.parameters()]
    with pytest.raises(GANDivergedError, match=match) as error:
        fit(model, tmp_path, batches=2)
    assert "checkpoints saved so far" in str(error.value) and "lower optimizer.lr" in str(error.value)
    assert model.critic_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(critic_before, model.critic.parameters()))


def test_sample_grids_go_to_wandb_loggers(trained, monkeypatch):
    class RecordingWandb(WandbLogger):
        def __init__(self):  # no run: only the logging calls matter here
            self.images = []

        def log_image(self, key, images, **kwargs):
            self.images.append((key, images))

    wandb = RecordingWandb()
    monkeypatch.setattr(trained.trainer, "_loggers", [wandb])
    trained.model.on_train_epoch_end()
    assert wandb.images and wandb.images[0][0] == "samples"
    assert all(Path(p).is_file() for p in wandb.images[0][1])


# ---- DiffAugment ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(OPERATIONS))
def test_each_augmentation_changes_images_and_passes_gradients(name):
    torch.manual_seed(0)
    x = (torch.rand(16, 1, 16, 16) * 2 - 1).requires_grad_(True)
    out = OPERATIONS[name](x)
    assert out.shape == x.shape and not torch.equal(out, x)
    out.pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_translation_shifts_the_image_and_fills_with_background():
    torch.manual_seed(3)
    x = torch.full((64, 1, 16, 16), 0.5)
    x[:, :, 8, 8] = 1.0  # one bright pixel: where it lands is the shift
    out = translation(x)
    assert set(out.unique().tolist()) <= {-1.0, 0.5, 1.0}  # values moved, background -1 where the image left
    landed = (out == 1.0).nonzero()[:, 2:] - 8
    assert len(landed) == 64 and landed.abs().max() <= 2  # at most 1/8 of the side
    assert len({tuple(d) for d in landed.tolist()}) > 5  # each image its own draw


def test_cutout_blanks_one_square_half_the_side_clipped_at_the_border():
    torch.manual_seed(5)
    holes = cutout(torch.zeros(200, 1, 16, 16)) == -1.0
    for hole in holes[:, 0]:
        rows, cols = hole.any(dim=1).nonzero()[:, 0], hole.any(dim=0).nonzero()[:, 0]
        assert hole.sum() == len(rows) * len(cols)  # one axis-aligned rectangle
        assert len(rows) <= 8 and len(cols) <= 8 and (len(rows) == 8 or rows[0] == 0 or rows[-1] == 15)
    sizes = holes.flatten(1).sum(1)
    assert (sizes == 64).float().mean() > 0.3 and len({tuple(h.nonzero()[0].tolist()) for h in holes}) > 20


def test_diffaugment_reaches_the_generator_and_is_applied_to_real_and_fake_alike(tmp_path):
    """The critic sees real and fake only through the augmentation, each with its own draw, and the
    generator's loss differentiates through it: the generator is trained against augmented critic inputs."""

    class Recording(nn.Module):
        def __init__(self, augment):
            super().__init__()
            self.augment, self.calls, self.input_gradients = augment, [], []

        def forward(self, x):
            out = self.augment(x)
            self.calls.append((x.detach().clone(), out.detach().clone(), x.requires_grad))
            if x.requires_grad:  # the generator's fakes: the gradient that comes back through the augmentation
                x.register_hook(lambda gradient: self.input_gradients.append(gradient.abs().sum().item()))
            return out

    torch.manual_seed(0)
    model = tiny_gan(n_critic=1, diffaugment=["translation", "cutout", "color"])
    recording = model.augment = Recording(model.augment)
    seen_by_critic = []
    model.critic.register_forward_pre_hook(lambda module, args: seen_by_critic.append(args[0].detach().clone()))
    generator_gradients = {name: [] for name, _ in model.generator.named_parameters()}
    for name, parameter in model.generator.named_parameters():
        parameter.register_hook(lambda gradient, name=name: generator_gradients[name].append(gradient.abs().sum()))
    data = loader(2)
    real_batches = [model.to_unit_range(images) for images, _ in data]
    fit(model, tmp_path, batches=2)
    assert len(recording.calls) == 6  # per batch: real and fake for the critic, fake for the generator
    assert len(seen_by_critic) == 8  # per batch: real, fake, the penalty's interpolates, the generator's fakes
    for batch, real in enumerate(real_batches):
        (real_in, real_out, _), (fake_in, fake_out, fake_grad), (gen_in, gen_out, gen_grad) = recording.calls[
            3 * batch : 3 * batch + 3
        ]
        assert torch.equal(real_in, real) and not torch.equal(real_out, real_in)  # the real batch, augmented
        assert not fake_grad and not torch.equal(fake_out, fake_in)  # the critic's fakes, augmented too
        assert gen_grad and not torch.equal(gen_out, gen_in)  # the generator's fakes: with their graph
        critic_real, critic_fake, interpolates, critic_generated = seen_by_critic[4 * batch : 4 * batch + 4]
        assert torch.equal(critic_real, real_out) and torch.equal(critic_fake, fake_out)  # only augmented images
        assert torch.equal(critic_generated, gen_out)
        direction = (real_out - fake_out).flatten(1)  # the penalty interpolates between the augmented pair
        epsilon = ((interpolates - fake_out).flatten(1) * direction).sum(1) / direction.pow(2).sum(1)
        rebuilt = fake_out + epsilon.view(-1, 1, 1, 1) * (real_out - fake_out)
        assert torch.allclose(rebuilt, interpolates, atol=1e-5) and epsilon.min() >= 0 and epsilon.max() <= 1

    # In training, the generator's loss reaches its output through the augmentation, and from there every layer:
    # once per generator step, and only then (the critic's fakes are detached).
    assert len(recording.input_gradients) == 2 and all(g > 0 for g in recording.input_gradients)
    for name, gradients in generator_gradients.items():
        assert len(gradients) == 2 and all(g > 0 for g in gradients), name


def test_r1_alone_trains_and_is_logged(tmp_path):
    model = tiny_gan(n_critic=1, gp_lambda=0.0, r1_gamma=1.0, diffaugment=["translation"])
    trainer = fit(model, tmp_path, batches=2)
    assert float(trainer.callback_metrics["train/gradient_penalty"]) == 0.0
    assert float(trainer.callback_metrics["train/r1_penalty"]) > 0.0
    assert isinstance(model.augment, DiffAugment) and model.augment.policy == ("translation",)


# ---- sampling and checkpoints ----------------------------------------------------------------------
def test_generate_is_deterministic_per_seed():
    model = tiny_gan()
    labels = torch.tensor([0, 1, 2, 2, 1])
    first, again, other = model.generate(labels, seed=3), model.generate(labels, seed=3), model.generate(labels, 4)
    assert first.shape == (5, 32, 32) and first.dtype == np.uint8
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert not model.training


def test_the_first_images_of_a_seed_do_not_depend_on_how_many_are_drawn():
    model = tiny_gan(latent_dim=10)  # not a multiple of torch's block of 16 normal draws
    many, few = model.generate(torch.zeros(7, dtype=torch.long), seed=2), model.generate(torch.zeros(3), seed=2)
    assert np.array_equal(many[:3], few)


def test_checkpoint_round_trip_reproduces_samples(trained, tmp_path):
    path = tmp_path / "gan.ckpt"
    trained.trainer.save_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert state["hyper_parameters"]["latent_dim"] == 16 and any(k.startswith("ema.") for k in state["state_dict"])
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    restored = load_gan(path)
    assert np.array_equal(restored.generate(labels, seed=7), trained.model.generate(labels, seed=7))
    assert (restored.critic_steps, restored.generator_steps) == (6, 3)
    assert not restored.training


def test_load_gan_refuses_other_checkpoints():
    classifier = {"hyper_parameters": {"net": {"_target_": "x"}, "class_names": CLASSES}, "state_dict": {}}
    with pytest.raises(ValueError, match="not a WGAN-GP checkpoint"):
        load_gan(classifier)


def test_report_names_classes_learnt_from_one_case_or_none(trained, tmp_path):
    table = pd.DataFrame(
        {
            "path": ["a.png", "b.png", "c.png", "d.png"],
            "label": ["normal", "normal", "arachnoid-cyst", "arachnoid-cyst"],
            "split": "train",
            "source": "roboflow",
            "case": ["n1", "n2", "a7", "a7"],
            "group": [0, 1, 2, 2],
            "part": "train",
            "target": [0, 0, 1, 1],
        }
    )
    datamodule = SimpleNamespace(part_table=lambda part: table)
    report = trained.model.report(trained.trainer, datamodule, tmp_path, options=None)
    metrics, notes = report.metrics, report.notes
    assert report.figures == {"samples/final": tmp_path / "samples.png"} and (tmp_path / "samples.png").is_file()
    assert trained.model.task == "generation" and all(k.startswith("gan/") for k in metrics)
    assert metrics["gan/critic_steps"] == 6 and metrics["gan/generator_steps"] == 3 and "gan/wasserstein" in metrics
    assert "Normal: learnt from 2 image(s) of 2 case(s)" in notes
    assert "Arachnoid cyst was learnt from a single case: its samples can only vary that case" in notes
    assert any(n.startswith("Encephalocele is absent from the training part") and "untrained" in n for n in notes)

    # A quality curve in the folder counts only when it ends at this generator's last step (not a stale one).
    point = dict(
        epoch=0, cpu_hours=0.5, fid=40.0, reference_fid=8.0, precision=0.8, recall=0.2, reference_precision=0.7
    )
    point |= dict(reference_recall=0.6, ood_acceptance=0.9, cas=0.1, reference_cas=0.3, evaluation_seconds=3.0)
    for last_step, counted in ((2, False), (3, True)):
        pd.DataFrame([point | {"generator_step": 0}, point | {"generator_step": last_step}]).to_csv(
            tmp_path / "quality_curve.csv", index=False
        )
        report = trained.model.report(trained.trainer, datamodule, tmp_path, options=None)
        assert ("quality/fid" in report.metrics) is counted and ("quality/curve" in report.figures) is counted
    assert report.metrics["quality/fid"] == 40.0 and report.metrics["quality/generator_step"] == 3
    assert any(n.startswith("Quality at generator step 3 (0.50 CPU-hours): FID 40.0") for n in report.notes)
