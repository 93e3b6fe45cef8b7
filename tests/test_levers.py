"""The training levers for the honest score: losses, class weights, mixup/cutmix, warm-up, layer-wise learning-rate
decay, test-time augmentation and ultrasound augmentation, each checked against its definition, and all of them
composed from the config and trained on real (tiny) data."""

from functools import partial

import albumentations as A
import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from fetalbrain.data.tta import mean_probability_logits
from fetalbrain.evaluation.calibration import apply_temperature, softmax
from fetalbrain.models.classifier import Classifier, cosine_with_warmup
from fetalbrain.models.losses import class_weights, classification_loss, log_prior
from fetalbrain.training.fit import build
from tests.conftest import TINY, train_config

CLASSES = [f"class{i}" for i in range(5)]
CNN = {"_target_": "fetalbrain.models.cnn.SmallCNN", "in_chans": 1, "widths": [4, 8], "conv": "standard"}
LITE0 = {
    "_target_": "fetalbrain.models.backbones.create_backbone",
    "name": "tf_efficientnet_lite0",
    "pretrained": False,
}


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 5, generator=generator) * 3
    targets = torch.randint(0, 5, (12,), generator=generator)
    return logits, targets


# ---- losses ------------------------------------------------------------------------------------------------------
def test_focal_gamma_0_and_logit_adjustment_tau_0_are_cross_entropy(batch):
    logits, targets = batch
    weight = torch.tensor([0.5, 1.0, 2.0, 0.0, 1.5])
    for options in ({}, {"weight": weight}, {"label_smoothing": 0.1}, {"weight": weight, "label_smoothing": 0.1}):
        reference = F.cross_entropy(logits, targets, **options)
        focal = classification_loss(logits, targets, "focal", focal_gamma=0.0, **options)
        adjusted = classification_loss(logits, targets, "logit_adjusted", prior=torch.randn(5), tau=0.0, **options)
        soft = classification_loss(logits, F.one_hot(targets, 5).float(), **options)  # the soft-target formula
        assert torch.allclose(focal, reference, atol=1e-6) and torch.allclose(adjusted, reference, atol=1e-6)
        assert torch.allclose(soft, reference, atol=1e-6)
    # gamma > 0: each image's cost is (1 - p_t)^gamma of its cross-entropy, smaller for images already right.
    log_p = logits.log_softmax(dim=1).gather(1, targets[:, None]).squeeze(1)
    expected = (-(1 - log_p.exp()).pow(2.0) * log_p).mean()
    assert torch.allclose(classification_loss(logits, targets, "focal", focal_gamma=2.0), expected, atol=1e-6)
    # tau > 0: cross-entropy of the logits shifted by tau * log prior, in training only.
    counts = torch.tensor([50.0, 5.0, 1.0, 0.0, 20.0])
    adjusted = classification_loss(logits, targets, "logit_adjusted", prior=log_prior(counts), tau=1.5)
    assert torch.allclose(adjusted, F.cross_entropy(logits + 1.5 * log_prior(counts), targets), atol=1e-6)
    assert torch.isfinite(log_prior(counts)).all() and log_prior(counts)[3] == log_prior(counts)[2]  # as 1 image


def test_class_balanced_weights_follow_the_effective_number_formula():
    counts = torch.tensor([400.0, 40.0, 4.0, 0.0, 1.0])
    beta = 0.99
    effective = (1 - beta ** counts[[0, 1, 2, 4]]) / (1 - beta)  # Cui et al. 2019, eq. 3
    expected = 1 / effective
    expected = expected * 4 / expected.sum()  # normalised to the number of classes present
    weights = class_weights(counts, "effective_number", beta)
    assert torch.allclose(weights[[0, 1, 2, 4]], expected) and weights[3] == 0
    assert torch.allclose(class_weights(counts, "effective_number", 0.0), torch.tensor([1.0, 1, 1, 0, 1]))
    balanced = class_weights(counts, "balanced")  # inverse frequency, the average training image weighs 1
    assert torch.allclose(balanced[[0, 1, 2, 4]], counts.sum() / (4 * counts[[0, 1, 2, 4]]))
    assert torch.allclose((balanced * counts).sum(), counts.sum())
    assert torch.equal(class_weights(counts, "none"), torch.ones(5))
    # beta -> 1 approaches inverse frequency; rarer classes always weigh more
    close = class_weights(counts, "effective_number", 0.999999)
    assert torch.allclose(close / close[0], balanced / balanced[0], rtol=1e-3)
    assert (weights[[0, 1, 2]].diff() > 0).all()


def test_bad_loss_settings_are_refused_by_key():
    for key, value, message in [
        ("loss", "hinge", "model.loss='hinge'"),
        ("class_weighting", "sqrt", "model.class_weighting='sqrt'"),
        ("label_smoothing", 2.0, "model.label_smoothing=2.0"),
        ("focal_gamma", -1.0, "model.focal_gamma=-1.0"),
        ("class_balance_beta", 1.0, "model.class_balance_beta=1.0"),
        ("tta", "rotate", "model.tta='rotate'"),
        ("layer_decay", 0.0, "model.layer_decay=0.0"),
        ("mix_prob", 1.5, "model.mix_prob=1.5"),
        ("mixup_alpha", -0.2, "model.mixup_alpha=-0.2"),
        ("logit_adjustment_tau", -1.0, "model.logit_adjustment_tau=-1.0"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
            Classifier(CNN, CLASSES, **{key: value})


# ---- mixup / cutmix ----------------------------------------------------------------------------------------------
def test_mixup_makes_soft_targets_and_the_loss_takes_them():
    model = Classifier(CNN, CLASSES, mixup_alpha=0.4)  # mixup alone, every batch (mix_prob 1)
    images, targets = torch.rand(7, 1, 16, 16), torch.tensor([0, 1, 2, 3, 4, 0, 1])
    np.random.seed(3)
    mixed, soft = model._mix(images, targets)
    assert soft.shape == (7, 5) and torch.allclose(soft.sum(dim=1), torch.ones(7))
    lam = float(soft[1, 1])  # image 1 (class 1) is mixed with its mirror in the (even) batch, image 4 (class 4)
    assert 0 < lam < 1 and soft[1, 4] == pytest.approx(1 - lam)
    assert torch.allclose(mixed[1], lam * images[1] + (1 - lam) * images[4])
    assert torch.equal(mixed[6], images[6]) and torch.equal(soft[6], F.one_hot(targets[6], 5).float())  # odd one
    # Soft targets: the loss is the mix of the two classes' losses (cross-entropy is linear in the target).
    logits = torch.randn(7, 5, requires_grad=True)
    loss = classification_loss(logits, soft, label_smoothing=0.0)
    per_image = -(soft * logits.log_softmax(dim=1)).sum(dim=1)
    assert torch.allclose(loss, per_image.mean())
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    cut = Classifier(CNN, CLASSES, cutmix_alpha=1.0)
    mixed, soft = cut._mix(images, targets)  # a box of the mirror image pasted in: targets mixed by its area
    changed = (mixed[1] != images[1]).float().mean()
    assert torch.allclose(soft[1, 4], changed, atol=0.02)


# ---- schedules ---------------------------------------------------------------------------------------------------
def learning_rates(scheduler, epochs: int) -> list[list[float]]:
    rates = []
    for _ in range(epochs):
        rates.append([group["lr"] for group in scheduler.optimizer.param_groups])
        scheduler.optimizer.step()
        scheduler.step()
    return rates


def test_warmup_starts_low_and_rises_to_the_learning_rate_before_the_cosine():
    def optimizer():
        parameters = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
        return torch.optim.SGD([{"params": parameters[:1], "lr": 0.01}, {"params": parameters[1:]}], lr=0.1)

    rates = learning_rates(cosine_with_warmup(optimizer(), T_max=10, eta_min=0.0, warmup_epochs=3), 10)
    assert rates[0] == pytest.approx([0.01 * 0.01, 0.1 * 0.01])  # each group starts at its own lr x the factor
    assert rates[0][1] < rates[1][1] < rates[2][1] < rates[3][1] == pytest.approx(0.1)
    assert all(a[1] > b[1] for a, b in zip(rates[3:], rates[4:]))  # then the cosine, down
    plain = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer(), T_max=10, eta_min=0.0)
    assert learning_rates(cosine_with_warmup(optimizer(), T_max=10, eta_min=0.0), 10) == learning_rates(plain, 10)
    with pytest.raises(ValueError, match="scheduler.warmup_epochs=10: must be >= 0 and below scheduler.T_max=10"):
        cosine_with_warmup(optimizer(), T_max=10, warmup_epochs=10)


def test_layer_decay_gives_earlier_blocks_lower_learning_rates():
    adamw = partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.01)
    model = Classifier(LITE0, CLASSES, optimizer=adamw, layer_decay=0.8, backbone_lr_factor=0.1)
    optimizer = model.configure_optimizers()
    rate = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    assert len(rate) == sum(len(g["params"]) for g in optimizer.param_groups) == len(list(model.parameters()))
    net = model.net
    stem, first, late, head_conv = (  # timm's layers: stem, each block, the last block with conv_head, classifier
        rate[id(net.conv_stem.weight)],
        rate[id(net.blocks[0][0].conv_dw.weight)],
        rate[id(net.blocks[-2][-1].conv_pwl.weight)],
        rate[id(net.conv_head.weight)],
    )
    assert rate[id(net.classifier.weight)] == pytest.approx(1e-3)  # the head: optimizer.lr
    assert head_conv == pytest.approx(1e-3 * 0.1 * 0.8)  # one layer below the classifier, x backbone_lr_factor
    assert stem < first < late < head_conv
    assert late == pytest.approx(head_conv * 0.8) and first == pytest.approx(stem / 0.8)
    assert all(group["weight_decay"] == 0.01 for group in optimizer.param_groups)  # the optimizer's own
    with pytest.raises(ValueError, match="model.layer_decay=0.8: SmallCNN has no layer groups"):
        Classifier(CNN, CLASSES, optimizer=adamw, layer_decay=0.8)  # at build, before any data or training


# ---- test-time augmentation --------------------------------------------------------------------------------------
def test_tta_flip_averages_the_probabilities_of_the_image_and_its_mirror():
    torch.manual_seed(0)
    model = Classifier(CNN, CLASSES, tta="flip", channels_last=False).eval()
    images = torch.rand(6, 1, 24, 24)
    loader = DataLoader(TensorDataset(images, torch.arange(6) % 5), batch_size=4)
    probs, targets = model.predict_proba(loader)
    with torch.no_grad():
        expected = (model(images).softmax(dim=1) + model(images.flip(-1)).softmax(dim=1)) / 2
        assert not torch.allclose(model(images).softmax(dim=1), expected, atol=1e-4)  # the mirror changes them
        model._evaluate((images, targets), "test")  # the test step: the same averaged probabilities
    assert torch.allclose(probs, expected, atol=1e-6) and torch.equal(targets, torch.arange(6) % 5)
    assert torch.allclose(model._outputs["test"][0][0].softmax(dim=1), expected, atol=1e-6)
    # Calibration is unchanged: temperature on these logits = temperature on the averaged probabilities.
    logits = mean_probability_logits([model(images).detach(), model(images.flip(-1)).detach()]).numpy()
    assert np.allclose(softmax(logits, 1.7), apply_temperature(expected.numpy(), 1.7), atol=1e-5)
    plain = Classifier(CNN, CLASSES, channels_last=False).eval()
    plain.load_state_dict(model.state_dict())
    assert torch.allclose(plain.predict_proba(loader)[0], model(images).softmax(dim=1).detach(), atol=1e-6)


def test_predictor_applies_tta_to_the_checkpoint_and_its_onnx_export(trained_checkpoint, tmp_path):
    from fetalbrain.export import export
    from fetalbrain.inference.predictor import Predictor

    plain = Predictor(trained_checkpoint, calibrated=False, ood=False)
    assert plain.tta == plain.card["tta"] == "none"  # the run's own setting by default
    batch = torch.rand(3, 1, 64, 64)
    expected = (plain.probabilities(batch) + plain.probabilities(batch.flip(-1))) / 2
    flipped = Predictor(trained_checkpoint, calibrated=False, tta="flip")  # with its OOD detector: features()
    assert np.allclose(flipped.probabilities(batch), expected, atol=1e-5)
    assert np.allclose(softmax(flipped.features(batch)[1]), expected, atol=1e-5)
    onnx = Predictor(export(trained_checkpoint, "onnx", tmp_path / "model.onnx"), calibrated=False, tta="flip")
    assert np.allclose(onnx.probabilities(batch), expected, atol=1e-4)  # two passes through the plain net


# ---- every lever from the config, trained on real images ---------------------------------------------------------
@pytest.mark.parametrize(
    "levers",
    [
        [
            "model=efficientnet_lite1",
            "data/transforms=ultrasound",
            "model.loss=focal",
            "model.class_weighting=effective_number",
            "model.label_smoothing=0.1",
            "model.mixup_alpha=0.2",
            "model.cutmix_alpha=1.0",
            "model.layer_decay=0.8",
            "scheduler.warmup_epochs=1",
            "model.freeze_backbone_epochs=0",
            "model.tta=flip",
        ],
        ["model=cnn", "model.loss=logit_adjusted", "model.logit_adjustment_tau=1.0", "model.label_smoothing=0.1"],
    ],
    ids=["lite1-focal-mix-decay-warmup-tta", "cnn-logit-adjusted"],
)
def test_levers_compose_and_train(tmp_path, small_export, levers):
    """Two epochs of one batch each: the warm-up epoch, then the cosine; test with TTA."""
    overrides = [*TINY, f"data.root={small_export}", "data/split=official", "trainer.max_epochs=2"]
    overrides += ["trainer.limit_train_batches=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    with train_config(tmp_path, [*overrides, *levers]) as cfg:
        datamodule, model, trainer = build(cfg)
    seen = {"targets": [], "lr": []}
    loss = model._loss
    model._loss = lambda logits, targets: (model.training and seen["targets"].append(targets)) or loss(logits, targets)

    class LearningRates(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            seen["lr"].append(trainer.optimizers[0].param_groups[-1]["lr"])

    trainer.callbacks.append(LearningRates())
    trainer.fit(model, datamodule=datamodule)
    trainer.test(model, datamodule=datamodule)
    counts = datamodule.train_class_counts()
    assert torch.allclose(model.class_log_prior, log_prior(counts))
    probs = model.test_results["probs"]
    assert torch.allclose(probs.sum(dim=1), torch.ones(len(probs)), atol=1e-5)
    if "model.tta=flip" in levers:
        assert model.net.pretrained_source == "file:efficientnet-lite1-77cc7160.pth"  # the packaged ImageNet weights
        assert torch.allclose(model.class_weights, class_weights(counts, "effective_number", 0.999))
        assert len(seen["targets"]) == 2 and all(t.ndim == 2 for t in seen["targets"])  # soft targets
        assert len({g["initial_lr"] for g in trainer.optimizers[0].param_groups}) > 10  # layer-wise rates
        assert seen["lr"][0] == pytest.approx(0.01 * seen["lr"][1])  # warm-up epoch, then the full rate
        steps = datamodule.datasets["train"].transform.transforms
        assert any(isinstance(step, A.Illumination) for step in steps)  # conf/data/transforms/ultrasound.yaml
    else:
        assert all(t.ndim == 1 for t in seen["targets"]) and torch.equal(model.class_weights, torch.ones(16))


def test_a_warm_up_that_ends_while_the_backbone_is_frozen_is_refused(tmp_path, small_export):
    overrides = [*TINY, f"data.root={small_export}", "data/split=official", "model=efficientnet_lite0"]
    with train_config(tmp_path, [*overrides, "scheduler.warmup_epochs=1", "model.freeze_backbone_epochs=1"]) as cfg:
        _, model, _ = build(cfg)
    with pytest.raises(ValueError, match="scheduler.warmup_epochs=1 <= model.freeze_backbone_epochs=1"):
        model.configure_optimizers()
