"""The old path of ``fetalbrain.training.tracking``: saved run configs (``config.yaml``) name
``fetalbrain.tracking.wandb_logger`` as a ``_target_``, so that ``resume=`` of older runs still builds it."""

from fetalbrain.training.tracking import wandb_logger

__all__ = ["wandb_logger"]
