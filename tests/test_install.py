"""What pyproject.toml promises: requirements.lock (``make lock``) pins every dependency within its bounds, and the
test suite silences only named third-party warnings (ours, deprecations above all, always show)."""

import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        assert not line.startswith("-"), f"requirements.lock: {line!r}: only name==version pins (make lock)"
        name, _, version = line.partition("==")
        assert version and "[" not in name, f"requirements.lock: {line!r} is not a plain name==version pin"
        pins[canonicalize_name(name)] = version
    return pins


def test_the_lock_pins_every_dependency_within_its_bounds():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = [Requirement(r) for r in [*project["dependencies"], *project["optional-dependencies"]["dev"]]]
    pins = lock_pins()
    missing = [str(r) for r in required if canonicalize_name(r.name) not in pins]
    assert not missing, f"not in requirements.lock: {missing}; run `make lock`"
    locked = {str(r): pins[canonicalize_name(r.name)] for r in required}
    outside = [f"{r} (locked {locked[str(r)]})" for r in required if not r.specifier.contains(locked[str(r)], True)]
    assert not outside, f"requirements.lock is outside pyproject.toml's bounds: {outside}; run `make lock`"
    assert canonicalize_name(project["name"]) not in pins  # the project itself installs editable, through the lock


def test_only_named_warnings_are_silenced():
    filters = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["filterwarnings"]
    for entry in filters:
        action, message, _, module = ([*entry.split(":", 4), "", "", "", ""])[:4]
        assert action != "ignore" or message or module, f"{entry!r} silences a whole category: name the warning"
        assert not module.startswith(("fetalbrain", "hydra_plugins")), f"{entry!r} silences our own code"
