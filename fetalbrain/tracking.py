"""The config-facing path of ``fetalbrain.training.tracking.wandb_logger``: ``conf/logger/wandb.yaml`` and every saved
run config name it as a ``_target_``, so runs and sweeps of any age resume with the same config. Code imports
``fetalbrain.training.tracking`` (an import-linter contract)."""

from fetalbrain.training.tracking import wandb_logger

__all__ = ["wandb_logger"]
