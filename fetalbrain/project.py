"""Where the project lies, its version, and what its configs offer: a leaf that every layer may import (the
package's ``__init__`` also registers the Hydra resolvers, which read run folders)."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CONF_DIR = PROJECT_ROOT / "conf"
__version__ = "0.1.0"


def plain(value):
    """A config value as plain Python (dicts, lists): what checkpoints keep (they load with weights_only), JSON
    results and job spec files hold."""
    from omegaconf import Container, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, Container) else value


def sha256_file(path: str | Path) -> str:
    """A file's SHA256, streamed (constant memory for a checkpoint of any size)."""
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def group_options(group: str) -> list[str]:
    """The options a user can choose in a config group (``conf/<group>/*.yaml``): internal files (``_name``) and
    examples to copy (``*.example``) are not choices."""
    folder = CONF_DIR / group
    names = sorted(path.stem for path in folder.glob("*.yaml")) if folder.is_dir() else []
    return [name for name in names if not name.startswith("_") and not name.endswith(".example")]


def _defaults(config: Path) -> dict[str, str]:
    """A config file's defaults list as {group: option}."""
    import yaml

    entries = yaml.safe_load(config.read_text()).get("defaults", []) if config.is_file() else []
    found = {}
    for entry in entries:
        if isinstance(entry, dict):
            for key, value in entry.items():
                found[key.removeprefix("override ").removeprefix("optional ").removeprefix("/")] = value
    return found


def config_groups(top: str, *groups: str) -> str:
    """``--help``'s list of choices: one line per group, its default first (from ``conf/<top>.yaml``, for a nested
    group from its parent's default option; Hydra's own groups default to its built-in ``basic``)."""
    defaults = _defaults(CONF_DIR / f"{top}.yaml")
    width = max(len(group) for group in groups)
    lines = []
    for group in groups:
        options = group_options(group)
        parent, _, child = group.rpartition("/")
        if group in defaults:
            default = defaults[group]
        elif parent == "hydra":
            default, options = "basic", ["basic", *options]
        elif parent in defaults:
            default = _defaults(CONF_DIR / parent / f"{defaults[parent]}.yaml").get(child)
        else:
            default = None
        if default in options:
            options = [f"{default} (default)"] + [o for o in options if o != default]
        lines.append(f"{group:<{width}}  {', '.join(options) or '(none)'}")
    return "\n".join(lines)
