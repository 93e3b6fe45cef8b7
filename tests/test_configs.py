"""Every option of every config group composes and instantiates; bad configs fail by name."""

import re
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate
from lightning.pytorch import Trainer
from omegaconf import OmegaConf, open_dict

from fetalbrain.models.classifier import Classifier
from tests.conftest import CONF, TINY, train_config

CLASSES = [f"class-{i}" for i in range(4)]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


def test_defaults_compose_to_the_documented_choices(tmp_path):
    with train_config(tmp_path) as cfg:
        assert cfg.model.name == "efficientnet_lite0"
        assert cfg.data.splitter == "grouped" and cfg.data.group_level == "case"
        assert Path(cfg.data.root).is_dir()
        assert cfg.optimized_metric == "val/f1_macro_best"
        assert "outputs/runs/" in cfg.hydra.run.dir


NOT_CLASSIFIERS = ("wgan_gp", "head_finder")  # a generator; the head finder (tests/test_head_finder.py)


@pytest.mark.parametrize("model", [m for m in options("model") if m not in NOT_CLASSIFIERS])
def test_every_model_option_builds_a_classifier(tmp_path, model):
    with train_config(
        tmp_path,
        [f"model={model}", "model.net.pretrained=false"] if model not in ("cnn", "separable") else [f"model={model}"],
    ) as cfg:
        with open_dict(cfg):
            cfg.model.net.pop("weights", None)
        module = instantiate(
            cfg.model, class_names=CLASSES, optimizer=instantiate(cfg.optimizer), scheduler=instantiate(cfg.scheduler)
        )
    assert isinstance(module, Classifier) and module.net.get_classifier().out_features == 4


def test_the_generator_option_builds_a_wgan_gp_with_its_own_groups(tmp_path):
    from fetalbrain.models.gan import ConditionalWGANGP

    with train_config(tmp_path, ["model=wgan_gp"]) as cfg:
        assert cfg.optimizer.betas == [0.0, 0.9] and not cfg.get("scheduler") and "early_stopping" not in cfg.callbacks
        assert cfg.data.transforms.augment == [] and cfg.data.image_size == 64
        preprocessing = {"image_size": 64, "channels": 1, "mean": 0.2, "std": 0.2}
        module = instantiate(
            cfg.model, class_names=CLASSES, preprocessing=preprocessing, optimizer=instantiate(cfg.optimizer)
        )
    assert isinstance(module, ConditionalWGANGP) and module.hparams.n_critic == 5 and module.hparams.gp_lambda == 10


@pytest.mark.parametrize(
    "group",
    [
        "optimizer",
        "scheduler",
        "trainer",
        "callbacks",
        "logger",
        "data/transforms",
        "data/split",
        "debug",
        "experiment",
        "hparams_search",
    ],
)
def test_every_option_of_every_group_composes_and_instantiates(tmp_path, group):
    for option in options(group):
        with train_config(tmp_path, [f"{group}={option}", "trainer=cpu" if group != "trainer" else "model=cnn"]) as cfg:
            OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
            if group == "optimizer":
                import torch

                instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
            elif group == "trainer" and option in ("cpu", "default"):
                assert isinstance(instantiate(cfg.trainer, logger=False), Trainer)
            elif group == "hparams_search":  # the search space parses: every key a distribution or a fixed value
                from hydra_plugins.fetalbrain_plugins.optuna_space import search_space

                space, _ = search_space(OmegaConf.to_container(cfg.hydra.sweeper.params), [])
                assert {"optimizer.lr", "model.label_smoothing"} <= set(space), option
            elif group in ("callbacks", "logger"):
                for entry in (cfg.get(group) or {}).values():
                    if entry:
                        instantiate(entry, **({"mode": "disabled"} if "wandb" in entry._target_ else {}))


def test_unknown_keys_and_options_are_rejected_by_name(tmp_path):
    with pytest.raises(ConfigCompositionException, match="data.imagesize"):
        with train_config(tmp_path, ["data.imagesize=64"]):
            pass
    with pytest.raises(ConfigCompositionException, match="Could not find 'model/resnet'"):
        with train_config(tmp_path, ["model=resnet"]):
            pass


def test_a_bad_value_fails_at_build_time_naming_the_option(tmp_path):
    from fetalbrain.training.fit import build

    with train_config(tmp_path, ["data.splitter=random", "logger=none"]) as cfg:
        with pytest.raises(ValueError, match="data.splitter='random'"):
            build(cfg)


@pytest.mark.parametrize(
    "override",
    [
        "evaluation.ood.method=foo",
        "evaluation.external.rule=foo",
        "evaluation.external.bootstrap.confidence=95",
        "evaluation.nearest_neighbour.distance=foo",
        "evaluation.hierarchy.groups.ventriculomegaly=[a]",
    ],
)
def test_bad_evaluation_settings_fail_before_anything_is_built(tmp_path, monkeypatch, override):
    """The report reads evaluation.ood and evaluation.external after training; train() refuses them at once."""
    import fetalbrain.training.fit

    monkeypatch.setattr(
        fetalbrain.training.fit, "build", lambda cfg: pytest.fail("built and trained despite " + override)
    )
    key = override.split("=")[0]
    with train_config(tmp_path, [override, "logger=none"]) as cfg:
        with pytest.raises(ValueError, match=f"^{re.escape(key)}="):
            fetalbrain.training.fit.train(cfg)
    assert not list(tmp_path.iterdir())  # not even the run's config.yaml


def test_the_evaluation_check_reads_only_what_the_report_will(tmp_path):
    """A generator writes no classification report, a switched-off check reads no settings, and the config of a run
    from before the checks existed (a resumed run keeps its config) has none: nothing to refuse."""
    from fetalbrain.training.fit import check_evaluation

    bad = ["evaluation.ood.method=foo", "evaluation.external.rule=foo"]
    with train_config(tmp_path, ["model=wgan_gp", *bad]) as cfg:
        check_evaluation(cfg)
    with train_config(tmp_path, [*bad, "evaluation.ood.enabled=false", "evaluation.external.enabled=false"]) as cfg:
        check_evaluation(cfg)
    with train_config(tmp_path, bad) as cfg:
        with open_dict(cfg):
            del cfg.evaluation.ood, cfg.evaluation.external
        check_evaluation(cfg)
    rule = ["evaluation.screening_min_sensitivity=0.9", "evaluation.external.rule=sensitivity_0.9"]
    with train_config(tmp_path, rule) as cfg:  # the rule's name follows the sensitivity target
        check_evaluation(cfg)


def test_a_hierarchy_group_of_unknown_classes_fails_before_training(tmp_path):
    """The groups' class names are checked as soon as the data are read, not by the report after training."""
    import fetalbrain.training.fit

    group = "evaluation.hierarchy.groups.ventriculomegaly=[mild-ventriculomegaly,severe-ventricolomegaly]"
    with train_config(tmp_path, [*TINY, group]) as cfg:
        with pytest.raises(ValueError, match="evaluation.hierarchy.groups.ventriculomegaly: 'severe-ventricolomegaly'"):
            fetalbrain.training.fit.train(cfg)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.json").exists()
