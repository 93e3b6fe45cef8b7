"""fetalbrain: fetal brain ultrasound anomaly classification with Lightning + Hydra."""

import os
from pathlib import Path

# albumentations checks PyPI for updates at import time; never do network I/O on import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
__version__ = "0.1.0"


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    # ${project_root:} lets configs name repo paths however the command was started.
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


_register_resolvers()
