"""Print the run folder (or best checkpoint) of one model and data.mix among a sweep's runs."""

import sys
from pathlib import Path

from fetalbrain.runs.layout import find_runs, read_summary

sweep, model, mix, what = sys.argv[1:5]
for run in find_runs([Path(sweep)], task="classification"):
    summary = read_summary(run)
    used = (summary["data"].get("synthetic") or {}).get("mix", "real")
    if summary["run"]["model"] == model and used == mix:
        print(summary["run"]["best_checkpoint"] if what == "checkpoint" else run)
        sys.exit(0)
sys.exit(f"no {model} run with data.mix={mix} under {sweep}")
