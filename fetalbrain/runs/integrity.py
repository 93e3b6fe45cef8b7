"""Checkpoint integrity: a checkpoint must match the SHA256 its run's model card recorded.

The card's metrics describe the weights that were trained; ``predict``, ``export``, ``generate``, the
GUI and ``synth_quality`` check a checkpoint here before loading it, so a changed or foreign file in a
carded run is refused. Light on purpose (hashlib and json only): every command imports it first.
"""

import json
import logging
from pathlib import Path

from fetalbrain.project import sha256_file
from fetalbrain.runs.checkpoints import run_folders
from fetalbrain.runs.layout import CHECKPOINT_DIR

log = logging.getLogger(__name__)

CARD_JSON = "model_card.json"
OVERRIDE = "Pass verify=false to override."


class CheckpointIntegrityError(ValueError):
    """A checkpoint its run's model card does not vouch for: changed since training, or not listed."""


def read_card(path: Path) -> dict:
    """The card's JSON; an unreadable card raises, since it can no longer vouch for anything."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointIntegrityError(
            f"{path}: unreadable model card ({error}). Restore it, or rewrite it with python -m fetalbrain.card "
            f"RUN_DIR --write --rehash if you accept that its metrics may not describe the checkpoints. {OVERRIDE}"
        ) from error


def find_card(checkpoint: Path) -> tuple[Path, Path] | None:
    """(card, checkpoint inside ``<run>/checkpoints/``) for a checkpoint as given, else where a symlink points."""
    for run_dir, path in run_folders(checkpoint):
        if (run_dir / CARD_JSON).is_file():
            return run_dir / CARD_JSON, path
    return None


def verify_checkpoint(checkpoint: Path, verify: bool = True) -> str:
    """Return "verified", "no card" (logged: nothing to check against) or "skipped" (``verify=False``).

    Raises ``CheckpointIntegrityError`` when the hash differs from the card's, or when the run has a card
    that does not list the file: a renamed or added copy must not slip past the check.
    """
    if not verify:
        return "skipped"
    found = find_card(checkpoint)
    if found is None:
        log.warning("%s: no model card found for this checkpoint, so it could not be verified", checkpoint)
        return "no card"
    card_path, path = found
    expected = (read_card(card_path).get("checkpoints") or {}).get(path.name)
    if expected is None:
        raise CheckpointIntegrityError(
            f"{checkpoint}: not listed in {card_path}, so the card's metrics do not describe it (a copy or a "
            f"file added after training?). {OVERRIDE}"
        )
    actual = sha256_file(checkpoint)
    if actual != expected:
        raise CheckpointIntegrityError(
            f"{checkpoint}: SHA256 {actual[:12]}… differs from {expected[:12]}… recorded in {card_path}; the "
            f"checkpoint changed after training, so the card's metrics do not describe it. {OVERRIDE}"
        )
    return "verified"


def check_checkpoints(run_dir: Path, card: dict) -> list[tuple[str, str, str]]:
    """(file, status, detail) for every checkpoint the card lists, and for files it does not list.

    Status is OK, CHANGED, MISSING (listed, not on disk) or UNLISTED (on disk, not listed).
    """
    folder = Path(run_dir) / CHECKPOINT_DIR
    listed = card.get("checkpoints") or {}
    results = []
    for name, expected in listed.items():
        path = folder / name
        if not path.is_file():
            results.append((name, "MISSING", "listed in the card, not on disk"))
            continue
        actual = sha256_file(path)
        if actual == expected:
            results.append((name, "OK", actual[:12]))
        else:
            results.append((name, "CHANGED", f"expected {expected[:12]}…, found {actual[:12]}…"))
    for path in sorted(folder.glob("*.ckpt")):
        if path.name not in listed:
            results.append((path.name, "UNLISTED", "not in the card: refused by predict, export and generate"))
    return results
