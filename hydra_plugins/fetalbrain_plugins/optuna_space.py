"""The search space: Hydra's sweep grammar turned into Optuna distributions, values turned back into overrides,
the grid a GridSampler walks, and a stored study checked against the configured space (the storage keeps the
space, so that a resumed or shared study is never searched with another one). The sweep's errors live here too,
as the search space raises most of them.

Hydra imports this module at start-up to find plugins: Optuna is imported lazily.
"""

import logging
import re
from typing import Any, Sequence

from hydra.errors import CompactHydraException

log = logging.getLogger(__name__)

SEARCH_SPACE_ATTR = "fetalbrain:search_space"  # study user attr: {param: Optuna distribution JSON}
FIXED_OVERRIDES_ATTR = "fetalbrain:fixed_overrides"  # study user attr: the first sweeper's fixed overrides


class OptunaSweepError(CompactHydraException):
    """A sweep that cannot start or go on: Hydra prints the message without a traceback."""


class StudyMismatchError(OptunaSweepError):
    """The configured study differs from the one in the storage (search space, direction)."""


def search_space(params: dict[str, str], arguments: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """Optuna distributions from Hydra's sweep grammar, and the fixed overrides to pass to every job.

    ``params`` (``hydra.sweeper.params``, key -> grammar) come first, then the command line, so a command-line
    sweep replaces a configured one and a fixed command-line value (``optimizer.lr=0.001``) takes the key
    out of the search. ``choice(a, b)`` and ``a,b``: categorical; ``range(a, b[, step])``: ints (or floats)
    from a, b excluded, by step; ``interval(a, b)``: floats (ints with ``int(interval(a, b))``);
    ``tag(log, interval(...))`` or ``tag(log, range(a, b))``: log scale."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    lines = [f"{key}={value}" for key, value in params.items()] + list(arguments)
    space: dict[str, Any] = {}
    fixed: dict[str, str] = {}
    for override in parser.parse_overrides(lines):
        name = override.get_key_element()
        space.pop(name, None)
        fixed.pop(name, None)
        if override.is_sweep_override():
            space[name] = _distribution(name, override)
        else:
            fixed[name] = override.input_line
    return space, list(fixed.values())


def _distribution(name: str, override) -> Any:
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    tags = set(getattr(value, "tags", ()) or ())
    log_scale = "log" in tags
    if isinstance(value, IntervalSweep):
        low, high = value.start, value.end
        if low is None or high is None or not low < high:
            raise OptunaSweepError(f"{name}: interval({low}, {high}) needs low < high")
        if log_scale and low <= 0:
            raise OptunaSweepError(f"{name}: a log-scale interval needs low > 0, got {low}")
        if isinstance(low, int) and isinstance(high, int):
            return IntDistribution(low, high, log=log_scale)
        return FloatDistribution(float(low), float(high), log=log_scale)
    if isinstance(value, RangeSweep):
        values = list(override.sweep_iterator())
        if not values:
            raise OptunaSweepError(f"{name}: range({value.start}, {value.stop}, {value.step}) is empty")
        low, high, step = min(values), max(values), abs(value.step)
        if log_scale and (step != 1 or not all(isinstance(v, int) for v in values)):
            raise OptunaSweepError(f"{name}: tag(log, range(...)) needs integers and step 1")
        if all(isinstance(v, int) for v in values):
            return IntDistribution(low, high, step=1 if log_scale else step, log=log_scale)
        return FloatDistribution(float(low), float(high), step=float(step))
    if isinstance(value, ChoiceSweep):
        if log_scale:
            raise OptunaSweepError(f"{name}: tag(log, ...) applies to interval(...) and range(...), not choice(...)")
        choices = list(override.sweep_iterator())
        if not all(isinstance(c, (str, int, float, bool)) for c in choices):
            raise OptunaSweepError(f"{name}: choice(...) takes strings, numbers and booleans, got {choices}")
        return CategoricalDistribution(choices)
    raise OptunaSweepError(f"{name}={override.get_value_element_as_str()}: Optuna cannot sample this sweep")


_PLAIN = re.compile(r"[A-Za-z_/][\w\-./]*")


def format_value(value: Any) -> str:
    """A parameter value as a Hydra override value that parses back to the same value."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in ("true", "false", "null", "inf", "nan"):
        return text
    return "'" + text.replace("'", "\\'") + "'"


def grid_values(name: str, distribution) -> list:
    """The values GridSampler walks for one parameter: choices, or the steps of a range."""
    from optuna.distributions import CategoricalDistribution

    if isinstance(distribution, CategoricalDistribution):
        return list(distribution.choices)
    step = getattr(distribution, "step", None)
    if step is None or getattr(distribution, "log", False) and step != 1:
        raise OptunaSweepError(
            f"{name}: GridSampler needs choice(...) or range(...); this parameter is continuous (interval)"
        )
    count = int(round((distribution.high - distribution.low) / step)) + 1
    return [type(distribution.low)(distribution.low + i * step) for i in range(count)]


def space_differences(stored: dict[str, str], configured: dict[str, str]) -> list[str]:
    """What differs between two search spaces given as {param: distribution JSON}."""
    from optuna.distributions import json_to_distribution

    differences = []
    for name in sorted(stored.keys() | configured.keys()):
        if name not in configured:
            differences.append(f"{name} only in the stored study ({json_to_distribution(stored[name])})")
        elif name not in stored:
            differences.append(f"{name} only in the config ({json_to_distribution(configured[name])})")
        elif json_to_distribution(stored[name]) != json_to_distribution(configured[name]):
            differences.append(
                f"{name}: stored {json_to_distribution(stored[name])}, configured "
                f"{json_to_distribution(configured[name])}"
            )
    return differences


def suggest(trial, name: str, distribution) -> Any:
    """Draw one parameter through the public suggest API (a queued trial gets its queued value)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    draw = trial.suggest_float if isinstance(distribution, FloatDistribution) else trial.suggest_int
    return draw(name, distribution.low, distribution.high, step=distribution.step, log=distribution.log)


def check_study(study, where: str, direction: str, configured: dict[str, str], fixed: list[str]) -> None:
    """Record the search space in a new study; refuse a study created with another space or direction.
    ``where`` names the study and its storage in the messages."""
    stored_direction = study.direction.name.lower()
    if stored_direction != direction:
        raise StudyMismatchError(
            f"{where} {stored_direction}s its objective, not hydra.sweeper.direction={direction}: "
            "resume it with its own direction, or start another study (hydra.sweeper.study_name or storage)"
        )
    attrs = study.user_attrs
    if SEARCH_SPACE_ATTR not in attrs:
        study.set_user_attr(SEARCH_SPACE_ATTR, configured)
        study.set_user_attr(FIXED_OVERRIDES_ATTR, fixed)
        attrs = study.user_attrs  # a sweeper that started at the same time may have written first
    differences = space_differences(attrs[SEARCH_SPACE_ATTR], configured)
    if differences:
        raise StudyMismatchError(
            f"{where} was created with another search space: {'; '.join(differences)}. Resume it with the "
            "search space it was created with, or start another study (hydra.sweeper.study_name or "
            "hydra.sweeper.storage)"
        )
    before = attrs.get(FIXED_OVERRIDES_ATTR)
    if before is not None and sorted(before) != sorted(fixed):
        log.warning(
            "%s was started with other fixed overrides: %s there, %s here. Its trials may not be comparable",
            where,
            " ".join(sorted(set(before) - set(fixed))) or "none",
            " ".join(sorted(set(fixed) - set(before))) or "none",
        )
