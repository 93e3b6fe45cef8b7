"""fetalbrain: fetal brain ultrasound anomaly classification with Lightning + Hydra."""

import os
from pathlib import Path

# albumentations checks PyPI for updates at import time; never do network I/O on import.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from fetalbrain.project import PROJECT_ROOT, __version__  # noqa: F401, E402  (re-exported)


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    # ${project_root:} lets configs name repo paths however the command was started.
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
    # conf/hydra/default.yaml: resume=RUN_DIR runs Hydra in that folder (checked before Hydra creates
    # anything) and leaves its .hydra/ (the original config and overrides) as the run wrote it.
    if not OmegaConf.has_resolver("run_dir"):
        OmegaConf.register_new_resolver("run_dir", _run_dir)
    if not OmegaConf.has_resolver("hydra_subdir"):
        OmegaConf.register_new_resolver("hydra_subdir", _hydra_subdir)
    # conf/hydra/help/*.yaml: --help lists each group's choices as they are on disk, without internal files.
    if not OmegaConf.has_resolver("config_groups"):
        from fetalbrain.project import config_groups

        OmegaConf.register_new_resolver("config_groups", config_groups)


def _run_dir(resume, new_run_dir: str) -> str:
    if resume is None:
        return new_run_dir
    from fetalbrain.runs.resume import check_resumable  # raises before Hydra creates or writes anything

    return os.path.abspath(check_resumable(str(resume)))


def _hydra_subdir(resume, ckpt_path, output_dir: str) -> str | None:
    """Keep the .hydra/ a run wrote: when resuming it, and when a sweep job's folder already holds a run
    (a sweep run again into its folder, a requeued cluster job; see ``runs.resume.resume_config``)."""
    from fetalbrain.runs.layout import CONFIG_FILE

    resuming = resume is not None or ckpt_path == "last" or (Path(output_dir) / CONFIG_FILE).is_file()
    return None if resuming else ".hydra"


_register_resolvers()
