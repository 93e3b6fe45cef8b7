"""Progress, one way for every command: ``track`` draws a bar on the terminal (stderr) for a loop over images, runs,
models or batches, saying what it does and how far; ``step`` logs a named step and its duration, so that a run's
train.log says where the time after the last epoch went. A leaf every layer may import."""

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

log = logging.getLogger(__name__)


def track(items: Iterable, description: str, total: int | None = None) -> Iterator:
    """Yield ``items`` while a bar shows ``description``, done/total, time taken and time left. Off a terminal (a
    log file, CI) rich draws the bar once, when the loop ends."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("left"), TimeRemainingColumn(), console=Console(stderr=True)) as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


@contextmanager
def step(name: str, logger: logging.Logger = log):
    """Log ``name`` as it starts and again with its duration when it ends (also when it fails)."""
    logger.info("%s ...", name)
    started = time.perf_counter()
    try:
        yield
    finally:
        logger.info("%s: %.1f s", name, time.perf_counter() - started)
