"""The config-facing path of ``fetalbrain.training.pruning.OptunaPruning``: ``conf/hparams_search/optuna.yaml`` and
every saved run config name it as a ``_target_``, so runs and sweeps of any age resume with the same config. Code
imports ``fetalbrain.training.pruning`` (an import-linter contract)."""

from fetalbrain.training.pruning import OptunaPruning

__all__ = ["OptunaPruning"]
