"""The old path of ``fetalbrain.training.pruning``: saved run configs (``config.yaml``) name
``fetalbrain.pruning.OptunaPruning`` as a ``_target_``, so that ``resume=`` of older runs still builds it."""

from fetalbrain.training.pruning import OptunaPruning

__all__ = ["OptunaPruning"]
