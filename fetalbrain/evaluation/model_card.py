"""Model cards: what a run's model is, what data and split it saw, how well it did, what it is not for.

``model_card.json``/``.md`` are built from the run directory alone and list the SHA256 of every
checkpoint; ``fetalbrain.runs.integrity`` checks a checkpoint against them before it is loaded, so the card's
numbers always describe the weights in use. Rewriting a card keeps those hashes: a changed checkpoint
is refused unless ``rehash`` says the new weights are accepted. Written by every run (``training.fit``) and by
``python -m fetalbrain.card``.

``model_card.md`` opens with the Hugging Face Hub's metadata (licence, datasets, tags, the test results as a
``model-index``), made by ``huggingface_hub`` and checked offline by ``front_matter_problems``: the card can be a
Hub repository's README as it is.
"""

import logging
import math
from datetime import datetime
from pathlib import Path

import yaml
from huggingface_hub import EvalResult, ModelCardData, metadata_load

from fetalbrain.data.classes import display_name
from fetalbrain.evaluation.external_normals import DEFAULT_WARN_BELOW
from fetalbrain.evaluation.intervals import mean_interval
from fetalbrain.project import __version__
from fetalbrain.runs.integrity import CARD_JSON, CheckpointIntegrityError, read_card, sha256_file
from fetalbrain.runs.layout import CHECKPOINT_DIR, CONFIG_FILE, SUMMARY_FILE, read_summary, task_of, write_json

log = logging.getLogger(__name__)


CARD_MD = "model_card.md"


PURPOSES = "method development, benchmarking, teaching"


INTENDED_USE = {
    "classification": f"Research on classifying fetal brain ultrasound images into anomaly categories ({PURPOSES}).",
    "generation": f"Research on generating synthetic fetal brain ultrasound images, e.g. to augment training data "
    f"({PURPOSES}).",
}


NOT_FOR = (
    "Not a medical device and not for diagnosis: do not use it to screen, diagnose or manage any "
    "patient or pregnancy, or to support any clinical decision."
)


SHORTCUT_AUROC = 0.7  # a trivial baseline above this tells normal from abnormal by something besides anatomy


CALIBRATION = {
    "test/ece": "ECE",
    "test/ece_temperature_scaled": "ECE after temperature scaling",
    "calibration/temperature": "temperature (fitted on validation)",
}


LEAK_WORDS = {"shared_source": "a source image", "shared_case": "a case", "shared_group": "a duplicate group"}


# The OOD detector (evaluation/ood.py) and the external normal check (evaluation/external_normals.py): their headline
# numbers, shown in their own sections and summarised over folds like the test metrics.
OOD = {
    "ood/auroc": "AUROC, OOD set against test images",
    "ood/test_flag_rate": "test images flagged",
    "ood/threshold": "threshold (chosen on validation)",
}


EXTERNAL = {
    "external/normal_specificity": "normal heads from another hospital called normal (screening threshold)",
    "external/fraction_predicted_normal": "normal heads from another hospital predicted normal (argmax)",
    "external/test_normal_specificity": "this run's test normals called normal (screening threshold)",
}


SOURCE_BOUND = "the normal-vs-abnormal decision may follow the acquisition source"


# Datasets known by the folder name of their copy (data/, data.download's full export, the export's own name): a
# stable identifier that is no Hub id (a Roboflow Universe address, a DOI) and the licence they are published under.
ROBOFLOW = {
    "name": "Fetal Brain Abnormalities Ultrasound v1 (Roboflow Universe)",
    "id": "https://universe.roboflow.com/hritwik-trivedi-gkgrv/fetal-brain-abnormalities-ultrasound/dataset/1",
    "license": "cc-by-4.0",
}
HC18 = {
    "name": "HC18 normal fetal heads, Radboud UMC (subset)",
    "id": "https://doi.org/10.5281/zenodo.1327317",
    "license": "cc-by-4.0",
}
KNOWN_DATASETS = {
    "fetal-brain-ultrasound": ROBOFLOW,
    "fetal-brain-ultrasound-full": ROBOFLOW,
    "fetal-brain-ultrasound-v1": ROBOFLOW,
    "hc18-normal-heads": HC18,
}


# Hub metadata. A class-conditional generator has no Hub pipeline tag: it gets none rather than a wrong one.
TAGS = ["medical-imaging", "ultrasound", "fetal-brain", "pytorch", "lightning"]
TASK_TAGS = {"classification": ["image-classification"], "generation": ["image-generation", "gan"]}
PIPELINE_TAGS = {"classification": "image-classification"}
HUB_METRIC_TYPES = {  # a result's metric type (its metrics.json key is its name): the Hub's id, where it has one
    "f1_macro": "f1",
    "precision_macro": "precision",
    "recall_macro": "recall",
    "auroc_macro": "roc_auc",
    "test_auroc": "roc_auc",
    "ece_temperature_scaled": "ece",
    "nll_temperature_scaled": "nll",
    "normal_specificity": "specificity",
    "test_normal_specificity": "specificity",
}


# The run's pictures, in the card's order, as relative links: the card shows them on the Hub and in a file browser.
FIGURES = {
    "training_curves.png": "Loss, macro F1 and learning rate per epoch",
    "confusion_matrix_normalised.png": "Confusion matrix of the test part, each true class normalised",
    "per_class_recall.png": "Recall of each class on the test part, with intervals",
    "reliability.png": "Reliability diagram of the test part",
    "ood_scores.png": "Out-of-distribution scores",
    "external_normals.png": "External normal check: abnormal scores of normal heads from another hospital",
}


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


def _finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _read_config(run_dir: Path) -> dict:
    path = run_dir / CONFIG_FILE  # saved resolved by training: plain YAML
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _component(cfg: dict | None) -> dict | None:
    """An optimizer or scheduler config as its class name and settings (Hydra's ``_keys_`` dropped)."""
    if not cfg:
        return None
    name = str(cfg.get("_target_", "")).rsplit(".", 1)[-1] or None
    return {"name": name, **{k: v for k, v in cfg.items() if not str(k).startswith("_")}}


def _summary_keys(metrics: dict, task: str) -> list[str]:
    """The metrics a card reports and summarises over folds: test numbers, or the GAN's for a generator."""
    if task == "generation":
        return sorted(k for k in metrics if k.startswith("gan/"))
    headline = {"screening/test_auroc", *OOD, *EXTERNAL} - {"ood/threshold"}  # a threshold is no result to average
    return sorted(k for k in metrics if k.startswith(("test/", "shortcut/")) or k in headline)


def fold_summary(run_dirs: list[Path], keys: list[str]) -> dict:
    """Mean ± std and a 95 % t-interval of each metric over the runs of a sweep (non-finite values left out)."""
    metrics = [read_summary(r).get("metrics") or {} for r in run_dirs]
    return {key: _clean(mean_interval([m[key] for m in metrics if _finite(m.get(key))])) for key in keys}


def _fold_section(run_dir: Path, folds: list[Path], keys: list[str], config: dict) -> dict:
    runs = list(dict.fromkeys(Path(d).resolve() for d in [run_dir, *folds]))  # the run may be among its folds
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


def _sentence(text) -> str:
    text = str(text).strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")


def _limitations(task: str, data: dict, metrics: dict, config: dict | None = None) -> list[str]:
    """Generic caveats, the data config's facts about its dataset, and what this run's own numbers show.
    ``config``: the run's config, for its ``evaluation.external.warn_below``."""
    split = data.get("split") or {}
    root = f" (`{Path(data['root']).name}`)" if data.get("root") else ""
    items = [
        "Research software, not a medical device: not validated for diagnosis or any clinical use.",
        f"One dataset{root}: performance on other machines, operators, gestational ages or populations is unknown.",
        *[_sentence(text) for text in data.get("limitations") or []],
    ]
    test = (split.get("leaked") or {}).get("test") or {}
    shared = [
        (v, LEAK_WORDS.get(k, k.removeprefix("shared_"))) for k, v in test.items() if k.startswith("shared_") and v
    ]
    if shared:
        (count, word), rest = shared[0], "".join(f", {v} {w}" for v, w in shared[1:])
        items.insert(
            0,
            f"The test part leaks: of its {test.get('images', '?')} images, {count} share {word} with the training "
            f"part{rest}; the test metrics overstate performance on new patients.",
        )
    if task == "generation":
        items.append("Synthetic images are not patients: they can only vary the cases the generator was shown.")
        return items
    missing = (split.get("missing_classes") or {}).get("test") or []
    if missing:
        items.append(f"Not evaluated (absent from the test part): {', '.join(display_name(c) for c in missing)}.")
    shortcuts = {k.split("/")[1]: v for k, v in metrics.items() if k.startswith("shortcut/") and _finite(v)}
    if shortcuts and max(shortcuts.values()) >= SHORTCUT_AUROC:
        name, auroc = max(shortcuts.items(), key=lambda item: item[1])
        items.append(
            f"A trivial shortcut baseline ({name.removesuffix('_test_auroc')}) tells abnormal from normal test "
            f"images with AUROC {auroc:.2f}: the screening result may follow acquisition rather than anatomy."
        )
    specificity = metrics.get("external/normal_specificity")
    external = ((config or {}).get("evaluation") or {}).get("external") or {}
    warn_below = external.get("warn_below", DEFAULT_WARN_BELOW)
    if _finite(specificity) and specificity < warn_below:
        how_many = "mostly" if specificity < 0.5 else "often"  # 0.5: a majority, what "mostly" means
        test = metrics.get("external/test_normal_specificity")
        facts = [
            f"{specificity:.0%} of {external.get('name') or 'them'} called normal"
            + (f" at the {external['rule']} threshold" if external.get("rule") else ""),
            *([f"{test:.0%} of this run's test normals"] if _finite(test) else []),
            f"below evaluation.external.warn_below {warn_below:g}",
        ]
        items.append(
            f"Normal heads from another hospital are {how_many} called abnormal: {SOURCE_BOUND} ({'; '.join(facts)})."
        )
    return items


def _csv_records(run_dir: Path, name: str) -> list[dict] | None:
    """A CSV the run wrote, as records (NaN as None); None when absent."""
    import pandas as pd

    path = Path(run_dir) / name
    if not path.is_file():
        return None
    table = pd.read_csv(path, dtype={"bin": str})
    return [{k: (None if pd.isna(v) else v) for k, v in row.items()} for row in table.to_dict("records")]


def _external_bins(run_dir: Path) -> list[dict] | None:
    """The external check per bin (``external_normals_by_bin.csv``), when the run wrote it."""
    from fetalbrain.evaluation.external_normals import BINS_FILE

    return _csv_records(run_dir, BINS_FILE)


def _external_bins_table(rows: list[dict]) -> list[str]:
    """One row per bin: images, subjects, and each rate with its interval over the bin's subjects."""
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    bins: dict[str, dict] = {}
    for row in rows:
        entry = bins.setdefault(row["bin"], {"images": row["images"], "subjects": row["subjects"]})
        value, low, high = row.get("value"), row.get("ci_low"), row.get("ci_high")
        text = "—" if value is None else f"{value:.2f}"
        if value is not None and low is not None and high is not None:
            text += f" [{low:.2f}, {high:.2f}]"
        entry[row["metric"]] = text
    lines = ["By bin of the heads' size in the frame (a proxy of gestational age: small heads, early pregnancies):", ""]
    names = {
        "normal_specificity": "called normal (screening threshold)",
        "fraction_predicted_normal": "predicted normal (argmax)",
        "ood_flag_rate": "flagged by the OOD detector",
    }
    header = ["bin", "images", "subjects", *[names.get(m, m) for m in metrics]]
    return lines + _table(header, [[b, e["images"], e["subjects"], *[e[m] for m in metrics]] for b, e in bins.items()])


def _dataset(root, role: str, name: str | None = None) -> dict:
    """A dataset known by its folder's name; else named, marked as a local folder: no identifier, licence unknown."""
    folder = Path(str(root)).name if root else None
    name = name or folder
    known = KNOWN_DATASETS.get(folder) or {"name": f"{name} (local folder)" if name else "unknown", "id": None}
    return {"license": None, **known, "role": role}


def _datasets(root, metrics: dict, config: dict) -> list[dict]:
    """The training data, and the external check's set when it ran."""
    datasets = [_dataset(root, "training")]
    if any(k.startswith("external/") for k in metrics):
        external = (config.get("evaluation") or {}).get("external") or {}
        datasets.append(_dataset(external.get("root"), "external", external.get("name")))
    return datasets


def build_card(run_dir: Path, folds: list[Path] | None = None) -> dict:
    """The card's content from the run directory alone (metrics.json, config.yaml, checkpoints/)."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    config = _read_config(run_dir)
    metrics = summary.get("metrics") or {}
    run = summary.get("run") or {}
    data = summary.get("data") or {}
    split = data.get("split") or {}
    data_cfg, model_cfg, trainer_cfg = (config.get(k) or {} for k in ("data", "model", "trainer"))
    task = task_of(summary)
    keys = _summary_keys(metrics, task)
    root = data.get("root", data_cfg.get("root"))
    thresholds: dict[str, dict] = {}
    for key, value in metrics.items():
        parts = key.split("/")
        if parts[0] == "screening" and len(parts) == 3:
            thresholds.setdefault(parts[1], {})[parts[2]] = value
    screening = {k: metrics[k] for k in ("screening/test_auroc", "screening/val_auroc") if k in metrics}
    best = run.get("best_checkpoint")
    notes = list(summary.get("notes") or [])
    if not config:
        notes.append(f"{CONFIG_FILE} is missing: the card's training settings come from {SUMMARY_FILE} alone")
    card = {
        "created": datetime.now().astimezone().isoformat(timespec="seconds"),
        "fetalbrain_version": __version__,
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
            "root": root,
            "datasets": _datasets(root, metrics, config),
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
            "head_frame": data.get("head_frame"),
        },
        "classes": summary.get("classes") or [],
        "metrics": {
            "run": {k: metrics[k] for k in keys},
            "folds": _fold_section(run_dir, list(folds), keys, config) if folds else None,
        },
        "calibration": {k: metrics[k] for k in (*CALIBRATION, "test/nll") if k in metrics} or None,
        "screening": {**screening, "thresholds": thresholds} if screening or thresholds else None,
        "shortcut": {k.split("/", 1)[1]: v for k, v in metrics.items() if k.startswith("shortcut/")} or None,
        "ood": {k: metrics[k] for k in OOD if k in metrics} or None,
        "external": {
            k: metrics[k] for k in sorted(metrics) if k.removesuffix("_ci_low").removesuffix("_ci_high") in EXTERNAL
        }
        or None,
        "external_by_bin": _external_bins(run_dir),
        "head_finder_by_bin": _csv_records(run_dir, "head_finder_by_bin.csv"),
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
        "intended_use": {
            "use": INTENDED_USE.get(task, f"Research on fetal brain ultrasound ({task}; {PURPOSES})."),
            "not_for": NOT_FOR,
        },
        "limitations": _limitations(task, data, metrics, config),
        "notes": notes,
        "figures": [name for name in FIGURES if (run_dir / name).is_file()],
        "best_checkpoint": Path(best).name if best else None,
        "checkpoints": {p.name: sha256_file(p) for p in sorted((run_dir / CHECKPOINT_DIR).glob("*.ckpt"))},
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


def _ordered(keys, first: list) -> list:
    """``first`` in its order, then the rest alphabetically: the card's JSON sorts keys, a reader should not."""
    return sorted(keys, key=lambda k: (first.index(k) if k in first else len(first), k))


def _in_part_order(by_part: dict | None) -> dict:
    return {k: by_part[k] for k in _ordered(by_part or {}, ["train", "val", "test"])}


def _metric_order(key: str) -> tuple:
    """Test metrics first, then screening, shortcut baselines, OOD detector and external check, as a reader looks."""
    ranks = ("test/", "screening/", "shortcut/", "ood/", "external/")
    return next((i for i, r in enumerate(ranks) if key.startswith(r)), len(ranks)), key


def _pairs(pairs: dict) -> list[str]:
    return _table(["", ""], [[f"**{k}**", v] for k, v in pairs.items()])


def _model_name(card: dict) -> str:
    return f"{card['model'].get('name') or 'model'} ({Path(card['run_dir']).name})"


def _result_keys(metrics: dict, task: str) -> list[str]:
    """A classifier's own results, for the model-index: on the test part and on the external check's set."""
    if task != "classification":
        return []
    results = {"screening/test_auroc", *EXTERNAL}
    return sorted(k for k, v in metrics.items() if _finite(v) and (k.startswith("test/") or k in results))


def _measured_on(key: str) -> str:
    return "external" if key.startswith("external/") and not key.startswith("external/test_") else "training"


def front_matter(card: dict) -> str:
    """The Hub's metadata, YAML between ``---`` lines, made by huggingface_hub so that the Hub reads what it wrote."""
    model, data, task = card["model"], card["data"], card["task"]
    datasets = {d["role"]: d for d in data.get("datasets") or []}  # none in a card written before the metadata
    split = {k: data[k] for k in ("splitter", "fold", "num_folds", "group_level") if data.get(k) is not None}
    results = []
    for key in _result_keys(card["metrics"]["run"], task):
        role = _measured_on(key)
        if role in datasets:
            name = key.rsplit("/", 1)[-1]
            results.append(
                EvalResult(
                    task_type="image-classification",
                    task_name="Fetal brain ultrasound classification",
                    dataset_type=datasets[role]["id"] or datasets[role]["name"],  # a local folder: its name, marked
                    dataset_name=datasets[role]["name"],
                    dataset_split="test" if role == "training" else None,
                    dataset_args=(split or None) if role == "training" else None,
                    metric_type=HUB_METRIC_TYPES.get(name, name),
                    metric_name=key,  # as in metrics.json, which the card's check compares it with
                    metric_value=card["metrics"]["run"][key],
                )
            )
    net = str(model["net"]).rsplit(".", 1)[-1].lower() if model.get("net") else None
    metadata = ModelCardData(
        license=(datasets.get("training") or {}).get("license") or "unknown",
        library_name="pytorch",
        pipeline_tag=PIPELINE_TAGS.get(task),
        tags=[*TAGS, *TASK_TAGS.get(task, []), *(t for t in (model.get("name"), net) if t)],
        datasets=[d["id"] for d in datasets.values() if d["id"]] or None,
        metrics=sorted({r.metric_type for r in results}) or None,
        model_name=_model_name(card) if results else None,
        eval_results=results or None,
    )
    return f"---\n{metadata.to_yaml()}\n---\n"


def _licence(card: dict) -> list[str]:
    """The weights take the training data's licence (CC BY 4.0: attribution travels with them); MIT is the code's."""
    datasets = card["data"].get("datasets") or []
    licence = next((d["license"] for d in datasets if d["role"] == "training"), None)
    if licence:
        text = f"**Weights: `{licence}`**: the licence of the data they were learnt from, whose attribution they carry."
    else:
        text = "**Weights: licence unknown.** The card names no licence of the training data, which decides it."
    text += " The fetalbrain code that trained them is MIT-licensed; that licence covers the code, not these weights."
    source = card["model"].get("pretrained_source")
    if source and not str(source).startswith("none"):
        text += f" They started from pretrained weights ({source}), which keep their own terms."
    roles = {"training": "training, validation and test", "external": "external check, never trained on"}
    lines = ["## Licence", "", text, ""]
    for d in datasets:
        name = f"[{d['name']}]({d['id']})" if d["id"] else d["name"]
        lines.append(f"- {name}: {roles[d['role']]}; licence {d['license'] or 'unknown'}")
    return lines + [""]


def _head_frame_section(frame: dict) -> list[str]:
    """How often the head frame found a head to frame, per class, and why it kept whole frames (head_frame.csv)."""
    lines = [
        "### Head frame (`data/harmonise=head`)",
        "",
        f"{frame['framed']} of {frame['images']} images framed on their fetal head ({frame['found']} found whole, "
        "the rest cut by the frame edge); the others kept whole. Per image: `head_frame.csv`.",
        "",
    ]
    found = frame.get("found_by_class") or {}
    lines += _table(
        ["class", "framed", "found whole"],
        [
            [display_name(c), f"{rate:.0%}", f"{found[c]:.0%}" if c in found else "–"]
            for c, rate in frame["framed_by_class"].items()
        ],
    )
    reasons = frame.get("whole_frame_reasons") or {}
    if reasons:
        lines += ["Whole frames kept: " + "; ".join(f"{n}× {reason}" for reason, n in reasons.items()), ""]
    return lines


def render_markdown(card: dict) -> str:
    """A readable rendering of the card: the same facts, in sections and tables."""
    model, data, training = card["model"], card["data"], card["training"]
    lines = [
        front_matter(card),
        f"# Model card: {_model_name(card)}",
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
        columns = _ordered({k for counts in leakage.values() for k in counts if k != "images"}, list(LEAK_WORDS))
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
    if data.get("head_frame"):
        lines += _head_frame_section(data["head_frame"])
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
        lines += ["## Calibration", "", *_pairs({v: card["calibration"].get(k) for k, v in CALIBRATION.items()})]
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
    if card.get("ood"):
        lines += ["## Out-of-distribution detector", ""]
        lines += ["Flags inputs unlike the training images (not a fetal brain ultrasound); see ood_scores.png.", ""]
        lines += _table(["", "key", "value"], [[OOD[k], f"`{k}`", v] for k, v in card["ood"].items()])
    if card.get("external"):
        ext = card["external"]
        lines += ["## External normal check", ""]
        lines += ["Normal heads from another hospital, never trained on: is `normal` anatomy or source?", ""]
        rows = []
        for key, label in EXTERNAL.items():
            if key in ext:
                low, high = ext.get(f"{key}_ci_low"), ext.get(f"{key}_ci_high")
                interval = f"[{_fmt(low)}, {_fmt(high)}]" if low is not None and high is not None else "—"
                rows.append([label, f"`{key}`", ext[key], interval])
        lines += _table(["", "key", "value", "interval (bootstrap over subjects)"], rows)
    if card.get("external_by_bin"):
        lines += _external_bins_table(card["external_by_bin"])
    if card.get("head_finder_by_bin"):
        lines += ["## Head finding on held-out subjects", ""]
        lines += [
            "By bin of head width (a proxy of gestational age); errors in pixels of each image (the shipped HC18 copy: "
            "256 px wide), over the heads found; Dice over every image.",
            "",
        ]
        columns = {
            "bin": "bin",
            "images": "images",
            "subjects": "subjects",
            "found": "found",
            "dice_mean": "Dice (mean)",
            "centre_px_median": "centre error (median px)",
            "semi_major_px_median": "semi-major error (median px)",
            "circumference_px_median": "circumference error (median px)",
            "circumference_rel_median": "circumference error (median, relative)",
        }
        rows = [[row.get(k) for k in columns] for row in card["head_finder_by_bin"]]
        lines += _table(list(columns.values()), rows)
    if card.get("figures"):
        lines += ["## Figures", ""]
        for name in card["figures"]:
            lines += [f"**{FIGURES.get(name, name)}**", "", f"![{FIGURES.get(name, name)}]({name})", ""]
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
    lines += _licence(card)
    lines += ["## Checkpoints", ""]
    if card["checkpoints"]:
        best = card.get("best_checkpoint")
        rows = [[f"`{n}`" + (" (handed on)" if n == best else ""), f"`{h}`"] for n, h in card["checkpoints"].items()]
        lines += _table(["file", "SHA256"], rows)
    else:
        lines += ["No checkpoint was found in `checkpoints/`.", ""]
    return "\n".join(lines).rstrip() + "\n"


def front_matter_problems(run_dir: Path) -> list[str]:
    """What keeps ``model_card.md``'s front matter from being this run's Hub metadata; empty when nothing.
    Offline: huggingface_hub parses it, and the checks are ours (``ModelCard.validate`` would ask the Hub)."""
    run_dir = Path(run_dir)
    path = run_dir / CARD_MD
    rewrite = f"`python -m fetalbrain.card {run_dir} --write` rewrites it"
    if not path.is_file():
        return [f"{path} is missing; {rewrite}"]
    try:
        metadata = metadata_load(path)
        data = ModelCardData(**(metadata or {}))
    except (yaml.YAMLError, ValueError, TypeError) as error:
        return [f"{path}: its front matter does not parse ({error}); {rewrite}"]
    if metadata is None:
        return [f"{path} has no front matter (written before cards carried the Hub's metadata); {rewrite}"]
    summary = read_summary(run_dir)
    task, metrics = task_of(summary), summary.get("metrics") or {}
    problems = []
    if not isinstance(data.license, str) or not data.license:
        problems.append("license is missing")
    elif data.license == "other" and not (data.license_name and data.license_link):
        problems.append("license other needs license_name and license_link")
    if not isinstance(data.tags, list) or not data.tags or not all(isinstance(t, str) and t for t in data.tags):
        problems.append(f"tags {data.tags!r}: not a list of tags")
    wanted = PIPELINE_TAGS.get(task)
    if wanted and data.pipeline_tag != wanted:
        problems.append(f"pipeline_tag {data.pipeline_tag!r}: a {task} run's is {wanted!r}")
    expected = {k: metrics[k] for k in _result_keys(metrics, task)}
    found = {r.metric_name or r.metric_type: r.metric_value for r in data.eval_results or []}
    problems += [
        f"model-index has no result {k} (metrics.json: {expected[k]})" for k in sorted(expected.keys() - found.keys())
    ]
    for key, value in found.items():
        if key not in expected:
            problems.append(f"model-index result {key} is not in metrics.json")
        elif value != expected[key]:
            problems.append(f"model-index result {key} is {value!r}, metrics.json says {expected[key]!r}")
    return [f"{path}: {problem}" for problem in problems]


def _keep_recorded(card_path: Path, found: dict[str, str]) -> dict[str, str]:
    """The card's recorded hashes, plus checkpoints new on disk; a changed one raises, as loading it would."""
    recorded = read_card(card_path).get("checkpoints") or {}
    changed = sorted(name for name, digest in recorded.items() if found.get(name, digest) != digest)
    if changed:
        raise CheckpointIntegrityError(
            f"{', '.join(changed)}: SHA256 differs from the hash recorded in {card_path}; the checkpoint changed "
            "after the card was written, so the card was not rewritten. Restore the original file; or pass "
            "rehash=True (--rehash) to record the new hash, accepting that the card's metrics may not describe "
            "the new weights."
        )
    added = sorted(set(found) - set(recorded))
    if added:
        log.warning("%s: adding checkpoints the card did not list: %s", card_path, ", ".join(added))
    return dict(sorted({**recorded, **found}.items()))


def write_model_card(run_dir: Path, folds: list[Path] | None = None, rehash: bool = False) -> dict:
    """Write ``model_card.json`` and ``.md`` into the run directory; return the card.

    An existing card's checkpoint hashes are kept (listed files missing from disk too): a changed checkpoint
    raises ``CheckpointIntegrityError`` unless ``rehash``, which takes every hash from disk anew.
    """
    run_dir = Path(run_dir)
    card = build_card(run_dir, folds)
    if (run_dir / CARD_JSON).is_file() and not rehash:
        card["checkpoints"] = _keep_recorded(run_dir / CARD_JSON, card["checkpoints"])
    write_json(run_dir / CARD_JSON, card)
    (run_dir / CARD_MD).write_text(render_markdown(card))
    return card
