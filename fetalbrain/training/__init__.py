"""Build and run one fit (``fit``): data, model, trainer, callbacks and loggers from the config; DDP ranks started
from the run's own config (``ddp``); the run's summary (``summary``); W&B tracking (``tracking``) and Optuna
pruning and storage (``pruning``)."""
