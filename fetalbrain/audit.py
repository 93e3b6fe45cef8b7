"""Audit a dataset for duplicates, groups and cross-split leakage.

    python -m fetalbrain.audit [ROOT] [--out DIR] [--threshold 6] [--format auto]

Writes ``report.md``, CSV tables and ``audit.png`` into ``--out`` (default
``outputs/audit/<dataset folder>``) and prints a short summary. Works on any dataset the readers
accept; unreadable images are listed, not fatal.
"""

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from fetalbrain.data.classes import display_name  # noqa: E402
from fetalbrain.data.duplicates import (  # noqa: E402
    DEFAULT_THRESHOLD,
    duplicate_pairs,
    fingerprints,
    merge_groups,
    near_duplicate_pairs,
)
from fetalbrain.data.images import ImageReadError, read_grayscale  # noqa: E402
from fetalbrain.data.readers import read_dataset  # noqa: E402
from fetalbrain.progress import track  # noqa: E402
from fetalbrain.project import PROJECT_ROOT  # noqa: E402

DEFAULT_ROOT = PROJECT_ROOT / "data" / "fetal-brain-ultrasound"
TRAIN = "train"


def leakage_table(table: pd.DataFrame, distances: np.ndarray, threshold: int) -> pd.DataFrame:
    """Per non-train split: images sharing each kind of group with train, or near-duplicating one."""
    is_train = (table["split"] == TRAIN).to_numpy()
    rows = []
    for split in sorted(set(table["split"]) - {TRAIN}):
        mask = (table["split"] == split).to_numpy()
        row = {"split": split, "images": int(mask.sum())}
        for level in ("source", "case", "group"):
            row[f"shared_{level}"] = int(table.loc[mask, level].isin(set(table.loc[is_train, level])).sum())
        row["near_duplicate_of_train"] = int((distances[np.ix_(mask, is_train)] <= threshold).any(axis=1).sum())
        rows.append(row)
    return pd.DataFrame(rows)


def threshold_table(table: pd.DataFrame, distances: np.ndarray, thresholds=range(0, 14, 2)) -> pd.DataFrame:
    """How many pairs each threshold links, by how related the two images are known to be."""
    upper = np.triu_indices(len(table), k=1)
    source, case = table["source"].to_numpy(), table["case"].to_numpy()
    same_source = (source[:, None] == source[None, :])[upper]
    same_case = (case[:, None] == case[None, :])[upper]
    d = distances[upper]
    return pd.DataFrame(
        [
            {
                "threshold": t,
                "pairs_same_source": int((d[same_source] <= t).sum()),
                "pairs_same_case_other_source": int((d[same_case & ~same_source] <= t).sum()),
                "pairs_different_cases": int((d[~same_case] <= t).sum()),
            }
            for t in thresholds
        ]
    )


def audit(root: Path, out: Path, threshold: int = DEFAULT_THRESHOLD, format: str = "auto") -> dict:
    table, classes = read_dataset(root, format)
    images, unreadable = [], []
    for path in track(table["path"], "Audit: reading images"):
        try:
            images.append(read_grayscale(path))
        except ImageReadError as error:
            unreadable.append(str(error))
            images.append(None)
    keep = [i for i, image in enumerate(images) if image is not None]
    table, images = table.iloc[keep].reset_index(drop=True), [images[i] for i in keep]
    out.mkdir(parents=True, exist_ok=True)

    counts = pd.crosstab(table["label"], table["split"]).reindex(classes, fill_value=0)
    counts["sources"] = table.groupby("label")["source"].nunique().reindex(classes, fill_value=0)
    counts["cases"] = table.groupby("label")["case"].nunique().reindex(classes, fill_value=0)
    counts.index = [display_name(c) for c in counts.index]
    counts.to_csv(out / "class_counts.csv")

    table["content_hash"], distances = fingerprints(images)
    exact = table[table.duplicated("content_hash", keep=False)].sort_values("content_hash")
    exact[["content_hash", "path", "label", "split"]].to_csv(out / "exact_duplicates.csv", index=False)
    pairs = near_duplicate_pairs(distances, threshold)
    pair_rows = pd.DataFrame(
        [
            {
                "distance": d,
                "path_a": table["path"][i],
                "label_a": table["label"][i],
                "split_a": table["split"][i],
                "path_b": table["path"][j],
                "label_b": table["label"][j],
                "split_b": table["split"][j],
            }
            for i, j, d in pairs
        ]
    )
    pair_rows.to_csv(out / "near_duplicates.csv", index=False)
    conflicts = pair_rows[pair_rows["label_a"] != pair_rows["label_b"]] if len(pair_rows) else pair_rows
    conflicts.to_csv(out / "label_conflicts.csv", index=False)

    table["group"] = merge_groups(table["case"], duplicate_pairs(table["content_hash"], distances, threshold))
    merged = table.groupby("group")["case"].agg(lambda c: sorted(set(c)))
    merged = merged[merged.map(len) > 1]
    table[["path", "label", "split", "source", "case", "group"]].to_csv(out / "groups.csv", index=False)
    leakage = leakage_table(table, distances, threshold)
    leakage.to_csv(out / "leakage.csv", index=False)
    thresholds = threshold_table(table, distances)
    thresholds.to_csv(out / "thresholds.csv", index=False)
    figure(table, distances, leakage, threshold, out / "audit.png")

    summary = {
        "images": len(table),
        "unreadable": unreadable,
        "classes": len(classes),
        "sources": table["source"].nunique(),
        "cases": table["case"].nunique(),
        "groups": table["group"].nunique(),
        "exact_duplicate_images": len(exact),
        "exact_duplicate_sets": exact["content_hash"].nunique(),
        "near_duplicate_pairs": len(pairs),
        "label_conflict_pairs": len(conflicts),
        "merged_cases": [" + ".join(c) for c in merged],
        "leakage": leakage,
        "threshold": threshold,
    }
    (out / "report.md").write_text(report_markdown(root, summary, counts, thresholds, conflicts))
    return summary


def figure(table, distances, leakage, threshold, path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    levels = ["shared_source", "shared_case", "shared_group", "near_duplicate_of_train"]
    x = np.arange(len(leakage))
    for k, level in enumerate(levels):
        left.bar(x + k * 0.2, leakage[level] / leakage["images"], 0.2, label=level.replace("_", " "))
    left.set_xticks(x + 0.3, [f"{s} (n={n})" for s, n in zip(leakage["split"], leakage["images"])])
    left.set_ylabel("fraction of images linked to a training image")
    left.set_ylim(0, 1)
    left.set_title("Cross-split leakage of the dataset's own split")
    left.legend(fontsize=8)
    upper = np.triu_indices(len(table), k=1)
    source, case = table["source"].to_numpy(), table["case"].to_numpy()
    same_source = (source[:, None] == source[None, :])[upper]
    same_case = (case[:, None] == case[None, :])[upper]
    bins = np.arange(0, 66, 2)
    right.hist(distances[upper][same_source], bins=bins, alpha=0.6, label="copies of one source image")
    right.hist(distances[upper][~same_case], bins=bins, alpha=0.6, label="images of different cases")
    right.axvline(threshold + 0.5, color="k", ls="--", label=f"near-duplicate threshold ({threshold} bits)")
    right.set_yscale("log")
    right.set_xlabel("perceptual-hash distance (bits of 64)")
    right.set_ylabel("image pairs")
    right.set_title("How far apart related and unrelated images are")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_markdown(root, summary, counts, thresholds, conflicts) -> str:
    leakage = summary["leakage"]
    lines = [
        f"# Dataset audit: `{root.name}`",
        "",
        f"{summary['images']} images, {summary['classes']} classes, {summary['sources']} source images, "
        f"{summary['cases']} cases, {summary['groups']} groups after merging duplicates "
        f"(perceptual-hash distance ≤ {summary['threshold']} bits, or identical pixels).",
        "",
        "## Leakage of the dataset's own split",
        "",
        leakage.to_string(index=False),
        "",
        "## Duplicates",
        "",
        f"- {summary['exact_duplicate_images']} images are pixel-identical to another "
        f"({summary['exact_duplicate_sets']} sets): `exact_duplicates.csv`.",
        f"- {summary['near_duplicate_pairs']} near-duplicate pairs: `near_duplicates.csv`.",
        f"- {summary['label_conflict_pairs']} of them carry **different labels**: `label_conflicts.csv`.",
        "- Cases joined by duplicates (re-uploads under another name or label): "
        + ("; ".join(summary["merged_cases"]) or "none")
        + ".",
        "",
        "## Choice of the near-duplicate threshold",
        "",
        "Pairs each threshold would link. Copies of one source (`_aug_N`) are mostly rotated or flipped and",
        "far apart; a good threshold links identical images across names without linking unrelated cases.",
        "",
        thresholds.to_string(index=False),
        "",
        "## Class counts",
        "",
        counts.to_string(),
        "",
    ]
    if summary["unreadable"]:
        lines += ["## Unreadable images", "", *[f"- {u}" for u in summary["unreadable"]], ""]
    if len(conflicts):
        lines += [
            "## Label conflicts (first 20)",
            "",
            conflicts.head(20)[["distance", "label_a", "label_b", "path_a", "path_b"]].to_string(index=False),
            "",
        ]
    return "\n".join(lines)


EXAMPLES = """examples:
  python -m fetalbrain.audit                                    # the embedded dataset -> outputs/audit/
  python -m fetalbrain.audit /data/another_export --out audit/  # a Roboflow export or a folder per class
  python -m fetalbrain.audit --threshold 4                      # stricter near-duplicates (pHash distance)

read more: docs/data.md"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fetalbrain.audit",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
    )
    parser.add_argument("root", nargs="?", type=Path, default=DEFAULT_ROOT, help="dataset folder")
    parser.add_argument("--out", type=Path, help="output folder (default outputs/audit/<dataset folder>)")
    parser.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD, help="near-duplicate pHash distance")
    parser.add_argument("--format", default="auto", choices=("auto", "roboflow", "folder"))
    args = parser.parse_args(argv)
    out = args.out or PROJECT_ROOT / "outputs" / "audit" / args.root.name
    summary = audit(args.root, out, args.threshold, args.format)
    print(
        f"{summary['images']} images, {summary['sources']} sources, {summary['cases']} cases, "
        f"{summary['groups']} groups after merging duplicates"
    )
    print(
        f"exact duplicates: {summary['exact_duplicate_images']} images; near-duplicate pairs: "
        f"{summary['near_duplicate_pairs']}; pairs with conflicting labels: {summary['label_conflict_pairs']}"
    )
    for row in summary["leakage"].itertuples():
        print(
            f"LEAKAGE {row.split}: {row.shared_source} of {row.images} images share a source image with train, "
            f"{row.shared_case} a case, {row.shared_group} a duplicate group; "
            f"{row.near_duplicate_of_train} are near-duplicates of a training image"
        )
    print(f"report: {out / 'report.md'}")


if __name__ == "__main__":
    main()
