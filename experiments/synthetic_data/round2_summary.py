"""Round 2's tables from a generator run's quality curve: the curve itself, the last point against the goals,
and where a power law through the curve's second half would reach them (a guess, labelled as one).

    python experiments/synthetic_data/round2_summary.py RUN_DIR experiments/synthetic_data/results/round2
"""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

GOALS = {  # the goals; FID as a multiple of the real-vs-real FID
    "fid_ratio": 2.0,
    "precision": 0.5,
    "recall": 0.3,
    "ood_acceptance": 0.9,
    "memorised_pixels": 0.10,
    "memorised_features": 0.10,
}


def power_law_reach(hours: np.ndarray, values: np.ndarray, target: float) -> float | None:
    """CPU-hours at which log(value) = a + b·log(hours), fitted on the curve's second half, reaches ``target``;
    None when the fit does not head towards it."""
    keep = (hours > 0) & (values > 0)
    hours, values = hours[keep], values[keep]
    half = hours[len(hours) // 2 :], values[len(values) // 2 :]
    if len(half[0]) < 3:
        return None
    slope, intercept = np.polyfit(np.log(half[0]), np.log(half[1]), 1)
    current = values[-1]
    if slope == 0 or (target < current) != (slope < 0):
        return None
    return float(np.exp((np.log(target) - intercept) / slope))


def markdown(frame: pd.DataFrame) -> str:
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def main(run_dir: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    curve = pd.read_csv(run_dir / "quality_curve.csv")
    curve["fid_ratio"] = curve["fid"] / curve["reference_fid"]
    shown = curve[
        ["generator_step", "cpu_hours", "wall_hours", "fid", "fid_ratio", "kid", "precision", "recall"]
        + ["ood_acceptance", "cas", "memorised_pixels", "memorised_features"]
    ].round(3)
    shown.to_csv(out / "quality_curve.csv", index=False)
    shown.to_csv(out / "readme_curve.csv", index=False)
    last = curve.iloc[-1]
    rows = []
    for key, goal in GOALS.items():
        value = float(last[key])
        lower_is_better = key.startswith(("fid", "memorised"))
        met = value <= goal if lower_is_better else value >= goal
        reach = None
        if not met and not key.startswith("memorised"):
            reach = power_law_reach(curve["cpu_hours"].to_numpy(), curve[key].to_numpy(), goal)
        rows.append(
            {
                "score": key,
                "goal": f"≤ {goal:g}" if lower_is_better else f"≥ {goal:g}",
                "last point": round(value, 3),
                "real validation": round(float(last["reference_" + key]), 3) if key != "fid_ratio" else 1.0,
                "met": "yes" if met else "no",
                "power law reaches it at (CPU-hours, a guess)": "–" if met or reach is None else f"{reach:,.0f}",
            }
        )
    goals = pd.DataFrame(rows)
    goals.to_csv(out / "readme_goals.csv", index=False)
    (out / "readme_tables.md").write_text(markdown(goals) + "\n" + markdown(shown))
    summary = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").is_file() else {}
    facts = {
        "generator_steps": int(last["generator_step"]),
        "cpu_hours": round(float(last["cpu_hours"]), 2),
        "wall_hours": round(float(last["wall_hours"]), 2),
        "train_seconds": summary.get("run", {}).get("train_seconds"),
        "reference_fid": round(float(last["reference_fid"]), 2),
    }
    (out / "facts.json").write_text(json.dumps(facts, indent=2) + "\n")
    for name, target in (("quality_curve.png", "quality_curve.png"), ("samples.png", "samples_fold0.png")):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, out / target)
    print(json.dumps(facts))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
