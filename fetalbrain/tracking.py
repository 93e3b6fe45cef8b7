"""Experiment tracking: a W&B logger that never prompts and never hangs.

``mode: auto`` logs online when an API key is configured and the server answers, otherwise offline
(runs land in ``<run dir>/wandb/offline-run-*``; upload later with ``wandb sync``). ``WANDB_MODE``
in the environment always wins.
"""

import logging
import netrc
import os
import socket
import sys
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)
MODES = ("auto", "online", "offline", "disabled")


def _server() -> tuple[str, int]:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    return url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)


def _server_reachable(timeout: float = 2.0) -> bool:
    try:
        socket.create_connection(_server(), timeout=timeout).close()
        return True
    except OSError:
        return False


def _api_key_configured() -> bool:
    """WANDB_API_KEY, or the netrc entry that `wandb login` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(_server()[0]) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def resolve_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"logger.wandb.mode={mode!r}: choose one of {', '.join(MODES)}")
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if mode != "auto":
        return mode
    if _api_key_configured() and _server_reachable():
        return "online"
    log.info("W&B: no API key or server unreachable; logging offline (upload later with `wandb sync`)")
    return "offline"


def wandb_logger(mode: str = "auto", log_model: bool = False, **kwargs) -> WandbLogger:
    mode = resolve_mode(mode)
    if mode != "online" and log_model:
        log.warning("W&B: log_model needs online mode; checkpoints stay in the run directory")
        log_model = False
    return WandbLogger(mode=mode, log_model=log_model, **kwargs)


def log_report(loggers, report) -> None:
    """A run's end-of-run report to W&B, once: its metrics and figures (a ``runs.Report``)."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_metrics(report.metrics)
            for key, path in report.figures.items():
                logger.log_image(key=key, images=[str(path)])


def finish_tracking() -> None:
    """Close the W&B run so that each job of a multirun becomes its own run."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish()
