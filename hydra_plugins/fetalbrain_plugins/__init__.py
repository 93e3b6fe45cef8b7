"""fetalbrain's Hydra plugins (Hydra loads plugins only from the ``hydra_plugins`` namespace package).

Kept light: Hydra imports every module here at start-up to discover plugins, so heavy imports
(torch, optuna, submitit) happen inside the plugins' methods.
"""
