"""Model cards and checkpoint integrity.

A run's ``model_card.json``/``.md`` say, in one place, what the model is, what data and split it saw
(leakage included), how well it did, what it must not be used for, and the SHA256 of every checkpoint:
``predict``, ``export``, ``generate`` and the GUI refuse a checkpoint that changed after training, so
the numbers on the card always describe the weights being used.

``python -m fetalbrain.card RUN_DIR [--write] [--folds DIR ...]`` prints the card and checks the
checkpoints against it.
"""

import argparse
import hashlib
import json
import math
import sys
from datetime import datetime
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

import fetalbrain
from fetalbrain.data.classes import display_name
from fetalbrain.runs import CHECKPOINT_DIR, CONFIG_FILE, SUMMARY_FILE, read_summary, write_json

CARD_JSON = "model_card.json"
CARD_MD = "model_card.md"
CHUNK = 1 << 20

INTENDED_USE = (
    "Research software for studying the classification of fetal brain ultrasound images into anomaly "
    "categories (method development, benchmarking, teaching)."
)
NOT_FOR = (
    "Not a medical device and not for diagnosis: do not use it to screen, diagnose or manage any "
    "patient or pregnancy, or to support any clinical decision."
)
DATASET_LIMITATIONS = (
    "`normal` images come from a single other acquisition source (BCNatal FETAL_PLANES_DB, "
    "`PatientNNNNN_PlaneN` files): a normal-versus-abnormal decision can follow the acquisition source "
    "instead of the anatomy (compare the screening AUROC with the shortcut baselines).",
    "Few cases per anomaly: the 212 source images come from 81 cases, and five classes (holoprosencephaly, "
    "hydranencephaly, intracranial tumour, mega cisterna magna, vein of Galen malformation) have a single "
    "case, so they cannot be tested on a case the model has not seen.",
    "One dataset, one export: performance on other machines, operators, gestational ages or populations is unknown.",
)


class CheckpointIntegrityError(ValueError):
    """A checkpoint's SHA256 differs from its run's model card: the card no longer describes it."""


def sha256_file(path: str | Path) -> str:
    """Streamed, so that a checkpoint of any size is hashed in constant memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---- building the card ---------------------------------------------------------------------------------
def _clean(value):
    """NaN/inf become null so that the card is strict JSON any tool can read."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _read_config(run_dir: Path) -> dict:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        return {}
    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}


def _short(target: str | None) -> str | None:
    return target.rsplit(".", 1)[-1] if isinstance(target, str) else target


def _component(cfg: dict | None) -> dict | None:
    """An optimizer or scheduler config as its class name and settings (Hydra's ``_keys_`` dropped)."""
    if not cfg:
        return None
    return {"name": _short(cfg.get("_target_")), **{k: v for k, v in cfg.items() if not str(k).startswith("_")}}


def _summary_keys(metrics: dict, task: str) -> list[str]:
    """The metrics a card reports and summarises over folds: test numbers, or the GAN's for a generator."""
    if task == "generation":
        return sorted(k for k in metrics if k.startswith("gan/"))
    keep = ("test/", "shortcut/")
    return sorted(k for k in metrics if k.startswith(keep) or k == "screening/test_auroc")


def fold_summary(run_dirs: list[Path], keys: list[str]) -> dict:
    """Mean ± std and a 95 % t-interval of each metric over the runs of a sweep (non-finite values left out)."""
    from scipy import stats  # a second to import: only fold summaries need it, not the integrity checks

    summaries = [read_summary(r) for r in run_dirs]
    result = {}
    for key in keys:
        values = np.array([s["metrics"][key] for s in summaries if _finite(s.get("metrics", {}).get(key))], float)
        n = len(values)
        mean = float(values.mean()) if n else None
        std = float(values.std(ddof=1)) if n > 1 else None
        half = float(stats.t.ppf(0.975, n - 1) * std / math.sqrt(n)) if n > 1 else None
        result[key] = {
            "n": n,
            "mean": mean,
            "std": std,
            "ci95_low": mean - half if half is not None else None,
            "ci95_high": mean + half if half is not None else None,
        }
    return result


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _fold_section(run_dir: Path, folds: list[Path], keys: list[str], config: dict) -> dict:
    runs, seen = [], set()
    for d in [run_dir, *folds]:
        d = Path(d).resolve()
        if d not in seen:  # the run itself may be passed among its folds
            seen.add(d)
            runs.append(d)
    described, warnings = [], []
    for d in runs:
        cfg = _read_config(d)
        data = cfg.get("data") or {}
        described.append({"run_dir": str(d), "fold": data.get("fold"), "seed": cfg.get("seed")})
        for what, mine, theirs in (
            ("model", (config.get("model") or {}).get("name"), (cfg.get("model") or {}).get("name")),
            ("splitter", (config.get("data") or {}).get("splitter"), data.get("splitter")),
        ):
            if mine != theirs:
                warnings.append(f"{d}: {what} {theirs!r} differs from this run's {mine!r}")
    pairs = [(r["fold"], r["seed"]) for r in described]
    if len(set(pairs)) < len(pairs):
        warnings.append(f"the same fold and seed appear more than once: (fold, seed) {pairs}")
    return {"n_runs": len(runs), "runs": described, "metrics": fold_summary(runs, keys), "warnings": warnings}


def _limitations(task: str, split: dict) -> list[str]:
    """The fixed dataset caveats, plus the ones this run's own split makes true."""
    items = list(DATASET_LIMITATIONS)
    test = (split.get("leaked") or {}).get("test") or {}
    words = {"shared_source": "a source image", "shared_case": "a case", "shared_group": "a duplicate group"}
    shared = [(v, words.get(k, k.removeprefix("shared_"))) for k, v in test.items() if k.startswith("shared_") and v]
    if shared:
        (count, word), rest = shared[0], "".join(f", {v} {w}" for v, w in shared[1:])
        items.insert(
            0,
            f"The test part leaks: of its {test.get('images', '?')} images, {count} share {word} with the training "
            f"part{rest}; the test metrics overstate performance on new patients.",
        )
    missing = (split.get("missing_classes") or {}).get("test") or []
    if missing and task == "classification":
        items.append(f"Not evaluated (absent from the test part): {', '.join(display_name(c) for c in missing)}.")
    if task == "generation":
        items.append("Synthetic images are not patients: they can only vary the cases the generator was shown.")
    return items


def build_card(run_dir: Path, folds: list[Path] | None = None) -> dict:
    """The card's content from the run directory alone (metrics.json, config.yaml, checkpoints/)."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    config = _read_config(run_dir)
    metrics = summary.get("metrics") or {}
    run = summary.get("run") or {}
    data = summary.get("data") or {}
    split = data.get("split") or {}
    data_cfg = config.get("data") or {}
    model_cfg = config.get("model") or {}
    trainer_cfg = config.get("trainer") or {}
    task = run.get("task", "classification")
    keys = _summary_keys(metrics, task)
    thresholds: dict[str, dict] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if parts[0] == "screening" and len(parts) == 3:
            thresholds.setdefault(parts[1], {})[parts[2]] = value
    screening = {k: metrics[k] for k in ("screening/test_auroc", "screening/val_auroc") if k in metrics}
    calibration = {
        k: metrics.get(k)
        for k in ("test/ece", "test/ece_temperature_scaled", "calibration/temperature", "test/nll")
        if k in metrics
    }
    checkpoints = sorted((run_dir / CHECKPOINT_DIR).glob("*.ckpt"))
    best = run.get("best_checkpoint")
    notes = list(summary.get("notes") or [])
    if not config:
        notes.append(f"{CONFIG_FILE} is missing: the card's training settings come from {SUMMARY_FILE} alone")
    card = {
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
        "fetalbrain_version": fetalbrain.__version__,
        "run_dir": str(run_dir.resolve()),
        "task": task,
        "model": {
            "name": run.get("model", model_cfg.get("name")),
            "net": run.get("net"),
            "target": model_cfg.get("_target_"),
            "parameters": run.get("parameters"),
            "pretrained_source": run.get("pretrained_source"),
        },
        "data": {
            "root": data.get("root", data_cfg.get("root")),
            "splitter": split.get("splitter", data_cfg.get("splitter")),
            "fold": data_cfg.get("fold"),
            "num_folds": data_cfg.get("num_folds"),
            "group_level": data_cfg.get("group_level"),
            "near_duplicate_threshold": data_cfg.get("near_duplicate_threshold"),
            "part_sizes": split.get("part_sizes"),
            "leakage": split.get("leaked"),
            "missing_classes": split.get("missing_classes"),
            "skipped_images": data.get("skipped_images") or [],
            "mix": data_cfg.get("mix"),
            "synthetic": data.get("synthetic"),
        },
        "classes": summary.get("classes") or [],
        "metrics": {
            "run": {k: metrics[k] for k in keys},
            "folds": _fold_section(run_dir, list(folds), keys, config) if folds else None,
        },
        "calibration": calibration or None,
        "screening": {**screening, "thresholds": thresholds} if screening or thresholds else None,
        "shortcut": {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("shortcut/")} or None,
        "training": {
            "epochs_trained": run.get("epochs_trained"),
            "max_epochs": run.get("max_epochs", trainer_cfg.get("max_epochs")),
            "image_size": run.get("image_size", data_cfg.get("image_size")),
            "batch_size": data_cfg.get("batch_size"),
            "optimizer": _component(config.get("optimizer")),
            "scheduler": _component(config.get("scheduler")),
            "precision": trainer_cfg.get("precision"),
            "seed": run.get("seed", config.get("seed")),
            "device": run.get("device"),
            "train_seconds": run.get("train_seconds"),
        },
        "intended_use": {"use": INTENDED_USE, "not_for": NOT_FOR},
        "limitations": _limitations(task, split),
        "notes": notes,
        "best_checkpoint": Path(best).name if best else None,
        "checkpoints": {p.name: sha256_file(p) for p in checkpoints},
    }
    return _clean(card)


# ---- markdown ------------------------------------------------------------------------------------------
def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, dict):
        return " · ".join(f"{k} {_fmt(v)}" for k, v in value.items()) or "—"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "—"
    return str(value)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return lines + [""]


def _settings(cfg: dict) -> str:
    """Optimizer or scheduler settings, numbers as written (a learning rate of 1e-5 is not 0.0000)."""
    cfg = dict(cfg)
    name = cfg.pop("name", None)
    settings = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in cfg.items())
    return f"{name} ({settings})" if settings else str(name)


def _in_part_order(by_part: dict | None) -> dict:
    """train, val, test in that order (the card's JSON sorts keys alphabetically)."""
    by_part = by_part or {}
    order = ["train", "val", "test"]
    return {k: by_part[k] for k in sorted(by_part, key=lambda k: (order.index(k) if k in order else 3, k))}


def _metric_order(key: str) -> tuple:
    """Test metrics first, then screening and shortcut baselines, as a reader looks for them."""
    ranks = ("test/", "screening/", "shortcut/")
    return next((i for i, r in enumerate(ranks) if key.startswith(r)), len(ranks)), key


def _pairs(pairs: dict) -> list[str]:
    return _table(["", ""], [[f"**{k}**", v] for k, v in pairs.items()])


def render_markdown(card: dict) -> str:
    """A readable rendering of the card: the same facts, in sections and tables."""
    model, data, training = card["model"], card["data"], card["training"]
    title = f"# Model card: {model.get('name') or 'model'} ({Path(card['run_dir']).name})"
    lines = [
        title,
        "",
        "> Research software. Not a medical device and not for diagnosis.",
        "",
        f"Run `{card['run_dir']}` · task {card['task']} · created {card['created']} · "
        f"fetalbrain {card['fetalbrain_version']}",
        "",
        "## Model",
        "",
    ]
    params = model.get("parameters")
    lines += _pairs(
        {
            "model": model.get("name"),
            "network": model.get("net"),
            "parameters": f"{params:,} ({params / 1e6:.2f} M)" if isinstance(params, int) else params,
            "pretrained weights": model.get("pretrained_source"),
        }
    )
    lines += ["## Data", ""]
    fold = data.get("fold")
    lines += _pairs(
        {
            "root": f"`{data.get('root')}`" if data.get("root") else None,
            "split": data.get("splitter"),
            "test fold": f"{fold} of {data.get('num_folds')}" if fold is not None else None,
            "group level": data.get("group_level"),
            "part sizes": _in_part_order(data.get("part_sizes")) or None,
            "training mix": data.get("mix"),
            "skipped images": len(data.get("skipped_images") or []),
        }
    )
    leakage = _in_part_order(data.get("leakage"))
    if leakage:
        known = ["shared_source", "shared_case", "shared_group"]
        found = {k for counts in leakage.values() for k in counts if k != "images"}
        columns = [k for k in known if k in found] + sorted(found - set(known))
        lines += ["### Leakage: validation and test images sharing with the training part", ""]
        lines += _table(
            ["part", "images", *[c.replace("_", " ") for c in columns]],
            [[part, counts.get("images"), *[counts.get(c) for c in columns]] for part, counts in leakage.items()],
        )
    missing = {p: c for p, c in _in_part_order(data.get("missing_classes")).items() if c}
    if missing:
        lines += ["### Classes missing from a part", ""]
        lines += [f"- **{part}**: {', '.join(display_name(c) for c in classes)}" for part, classes in missing.items()]
        lines += [""]
    if data.get("skipped_images"):
        lines += ["### Skipped images", "", *[f"- `{p}`" for p in data["skipped_images"]], ""]
    if data.get("synthetic"):
        lines += ["### Synthetic training images", "", *_pairs(data["synthetic"])]
    if card.get("classes"):
        lines += [f"**Classes ({len(card['classes'])}):** " + ", ".join(display_name(c) for c in card["classes"]), ""]
    lines += ["## Metrics", ""]
    run_metrics = {k: card["metrics"]["run"][k] for k in sorted(card["metrics"]["run"], key=_metric_order)}
    folds = card["metrics"].get("folds")
    if folds:
        lines += [f"This run, and mean ± std [95 % t-interval] over {folds['n_runs']} runs of the sweep.", ""]
        rows = []
        for key, value in run_metrics.items():
            s = folds["metrics"].get(key) or {}
            spread = f"{_fmt(s.get('mean'))} ± {_fmt(s.get('std'))}"
            interval = f"[{_fmt(s.get('ci95_low'))}, {_fmt(s.get('ci95_high'))}]"
            rows.append([key, value, spread, interval, s.get("n")])
        lines += _table(["metric", "this run", "mean ± std", "95 % CI", "n"], rows)
        lines += [f"- fold {_fmt(r['fold'])}, seed {_fmt(r['seed'])}: `{r['run_dir']}`" for r in folds["runs"]]
        lines += [f"- **warning**: {w}" for w in folds["warnings"]] + [""]
    else:
        lines += _table(["metric", "value"], [[k, v] for k, v in run_metrics.items()]) if run_metrics else []
    if card.get("calibration"):
        cal = card["calibration"]
        lines += ["## Calibration", ""]
        lines += _pairs(
            {
                "ECE": cal.get("test/ece"),
                "ECE after temperature scaling": cal.get("test/ece_temperature_scaled"),
                "temperature (fitted on validation)": cal.get("calibration/temperature"),
            }
        )
    if card.get("screening"):
        scr = card["screening"]
        lines += ["## Screening: abnormal versus normal", ""]
        lines += _pairs({"test AUROC": scr.get("screening/test_auroc"), "val AUROC": scr.get("screening/val_auroc")})
        if scr.get("thresholds"):
            lines += ["Operating thresholds chosen on validation, applied to test:", ""]
            lines += _table(
                ["rule", "threshold", "test sensitivity", "test specificity"],
                [
                    [rule, t.get("threshold"), t.get("test_sensitivity"), t.get("test_specificity")]
                    for rule, t in scr["thresholds"].items()
                ],
            )
    if card.get("shortcut"):
        lines += ["## Shortcut baselines", ""]
        lines += ["Trivial models of normal versus abnormal; near the screening AUROC, suspect the source.", ""]
        lines += _table(["baseline", "test AUROC"], [[k, v] for k, v in card["shortcut"].items()])
    lines += ["## Training", ""]
    optimizer, scheduler = training.get("optimizer") or {}, training.get("scheduler") or {}
    lines += _pairs(
        {
            "epochs": f"{_fmt(training.get('epochs_trained'))} of {_fmt(training.get('max_epochs'))}",
            "image size": training.get("image_size"),
            "batch size": training.get("batch_size"),
            "optimizer": _settings(optimizer) if optimizer else None,
            "scheduler": _settings(scheduler) if scheduler else None,
            "precision": training.get("precision"),
            "seed": training.get("seed"),
            "device": training.get("device"),
            "training time": f"{training['train_seconds']:g} s" if training.get("train_seconds") is not None else None,
        }
    )
    lines += ["## Intended use and limitations", ""]
    lines += [f"**Intended use.** {card['intended_use']['use']}", "", f"**Not for.** {card['intended_use']['not_for']}"]
    lines += ["", "**Limitations.**", "", *[f"- {item}" for item in card["limitations"]], ""]
    if card.get("notes"):
        lines += ["**Notes from the run.**", "", *[f"- {note}" for note in card["notes"]], ""]
    lines += ["## Checkpoints", ""]
    if card["checkpoints"]:
        best = card.get("best_checkpoint")
        rows = [[f"`{n}`" + (" (best)" if n == best else ""), f"`{h}`"] for n, h in card["checkpoints"].items()]
        lines += _table(["file", "SHA256"], rows)
    else:
        lines += ["No checkpoint was found in `checkpoints/`.", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_model_card(run_dir: Path, folds: list[Path] | None = None) -> dict:
    """Write ``model_card.json`` and ``model_card.md`` into the run directory; return the card."""
    run_dir = Path(run_dir)
    card = build_card(run_dir, folds)
    write_json(run_dir / CARD_JSON, card)
    (run_dir / CARD_MD).write_text(render_markdown(card))
    return card


# ---- integrity -----------------------------------------------------------------------------------------
def _in_run(checkpoint: Path) -> Path | None:
    """The checkpoint as a file of a run's ``checkpoints/`` folder: as given, else where a symlink points."""
    for path in dict.fromkeys((Path(checkpoint).absolute(), Path(checkpoint).resolve())):
        if path.parent.name == CHECKPOINT_DIR and (path.parent.parent / CARD_JSON).is_file():
            return path
    return None


def find_card(checkpoint: Path) -> Path | None:
    """The model card of the run a checkpoint belongs to; checkpoints live in ``<run>/checkpoints/``."""
    path = _in_run(checkpoint)
    return path.parent.parent / CARD_JSON if path else None


def read_card(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointIntegrityError(
            f"{path}: unreadable model card ({error}); rewrite it with python -m fetalbrain.card RUN_DIR --write "
            "or pass verify=false to override"
        ) from error


def verify_checkpoint(checkpoint: Path, verify: bool = True) -> str:
    """Return "verified", "no card", "not listed" (the caller warns) or "skipped"; a changed checkpoint raises."""
    if not verify:
        return "skipped"
    checkpoint = Path(checkpoint)
    path = _in_run(checkpoint)
    if path is None:
        return "no card"
    card_path = path.parent.parent / CARD_JSON
    expected = (read_card(card_path).get("checkpoints") or {}).get(path.name)
    if expected is None:
        return "not listed"
    actual = sha256_file(checkpoint)
    if actual != expected:
        raise CheckpointIntegrityError(
            f"{checkpoint}: SHA256 {actual[:12]}… differs from {expected[:12]}… recorded in {card_path}; the "
            "checkpoint changed after training, so the card's metrics do not describe it. Pass verify=false "
            "to override."
        )
    return "verified"


def check_checkpoints(run_dir: Path, card: dict) -> list[tuple[str, str, str]]:
    """(file, status, detail) for every checkpoint the card lists, and for files it does not list."""
    folder = Path(run_dir) / CHECKPOINT_DIR
    results = []
    for name, expected in (card.get("checkpoints") or {}).items():
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
        if path.name not in (card.get("checkpoints") or {}):
            results.append((path.name, "UNLISTED", "not in the card (written after it?)"))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fetalbrain.card",
        description="Print a run's model card (writing it when asked or missing) and check its checkpoints.",
    )
    parser.add_argument("run_dir", type=Path, help="a run directory (holds metrics.json)")
    parser.add_argument("--write", action="store_true", help="(re)write model_card.json/.md, hashing checkpoints anew")
    parser.add_argument(
        "--folds", type=Path, nargs="+", default=None, help="other runs of the same sweep: mean, std, 95%% interval"
    )
    args = parser.parse_args(argv)
    run_dir: Path = args.run_dir
    if not (run_dir / SUMMARY_FILE).is_file():
        print(f"error: {run_dir} is not a run directory (no {SUMMARY_FILE})", file=sys.stderr)
        return 2
    card_path = run_dir / CARD_JSON
    if args.folds and card_path.is_file() and not args.write:
        print("error: --folds rewrites the card (and re-hashes the checkpoints): add --write", file=sys.stderr)
        return 2
    for fold in args.folds or []:
        if not (fold / SUMMARY_FILE).is_file():
            print(f"error: --folds {fold} is not a run directory (no {SUMMARY_FILE})", file=sys.stderr)
            return 2
    if args.write or not card_path.is_file():
        card = write_model_card(run_dir, args.folds)
        print(f"wrote {card_path} and {run_dir / CARD_MD}", file=sys.stderr)
    else:
        try:
            card = read_card(card_path)
        except CheckpointIntegrityError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    print(render_markdown(card))
    results = check_checkpoints(run_dir, card)
    width = max((len(name) for name, _, _ in results), default=0)
    for name, status, detail in results:
        print(f"{status:<8} {name:<{width}}  {detail}")
    bad = [name for name, status, _ in results if status in ("CHANGED", "MISSING")]
    if bad:
        print(
            f"error: {len(bad)} checkpoint(s) changed or missing since the card was written ({', '.join(bad)}): "
            "its metrics no longer describe them. Restore the files, or rewrite the card with --write if the "
            "change is intended.",
            file=sys.stderr,
        )
        return 1
    if not card.get("checkpoints"):
        print("note: the card lists no checkpoint", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
