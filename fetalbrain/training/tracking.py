"""Experiment tracking: a W&B logger that never prompts and never hangs.

Every job of a sweep lands in one W&B group (the sweep's folder), with the model's task as job_type
and fold, seed and task as top-level config keys, so the W&B UI compares folds and models as they are.
``mode: auto`` logs online when an API key is configured and the server answers, otherwise offline
(runs land in ``<run dir>/wandb/offline-run-*``; upload later with ``wandb sync``). ``WANDB_MODE``
in the environment always wins. The W&B run id is kept in ``<run dir>/wandb_run.json`` so that a
resumed run (``resume=RUN_DIR``) goes on in the same W&B run.
"""

import json
import logging
import netrc
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.loggers import WandbLogger
from omegaconf import DictConfig, open_dict

log = logging.getLogger(__name__)
MODES = ("auto", "online", "offline", "disabled")
WANDB_RUN_FILE = "wandb_run.json"


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


def sweep_group() -> str | None:
    """The W&B group of a multirun job: its sweep's folder (``multirun/<date>/<time>``), shared by every
    job of the sweep, whatever launched them; None for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    sweep_dir = Path(HydraConfig.get().sweep.dir)
    return "/".join(sweep_dir.parts[-3:])


def wandb_logger(mode: str = "auto", log_model: bool = False, group: str | None = None, **kwargs) -> WandbLogger:
    mode = resolve_mode(mode)
    if mode != "online" and log_model:
        log.warning("W&B: log_model needs online mode; checkpoints stay in the run directory")
        log_model = False
    return WandbLogger(mode=mode, log_model=log_model, group=group or sweep_group(), **kwargs)


def record_wandb_run(loggers, run_dir: Path) -> None:
    """Write the W&B run id into the run folder as soon as the run starts: a killed run has it too."""
    if rank_zero_only.rank != 0:  # DDP: one writer (the other ranks' loggers do not know the group)
        return
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger.version:
            payload = {"id": logger.version, "project": logger.name, "group": logger._wandb_init.get("group")}
            (Path(run_dir) / WANDB_RUN_FILE).write_text(json.dumps(payload, indent=2) + "\n")


def continue_wandb_run(cfg: DictConfig, run_dir: Path) -> None:
    """Point the config's W&B logger at the run recorded in the run folder (``id=``, ``resume="allow"``)."""
    entries = [e for e in (cfg.get("logger") or {}).values() if e and "wandb" in str(e.get("_target_", "")).lower()]
    record = Path(run_dir) / WANDB_RUN_FILE
    if not entries:
        return
    if not record.is_file():
        log.warning("W&B: %s has no %s; the resumed run starts a new W&B run", run_dir, WANDB_RUN_FILE)
        return
    recorded = json.loads(record.read_text())
    run_id = recorded["id"]
    for entry in entries:
        with open_dict(entry):
            entry.id, entry.resume = run_id, "allow"
            if entry.get("group") is None and recorded.get("group"):  # a sweep job resumed by hand stays in its group
                entry.group = recorded["group"]
    log.info("W&B: resuming run %s", run_id)


def log_report(loggers, report) -> None:
    """A run's end-of-run report to W&B, once: its metrics and figures (a ``runs.layout.Report``)."""
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
