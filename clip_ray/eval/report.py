"""Evaluation metrics as a table a person reads: one row per measure, one column per model state.

Zero-shot rows carry the chance level beside them, since an accuracy means little
without it (1/12 on the demo's held-out classes, 1/10 on CIFAR-10).
"""

from __future__ import annotations

import math

# (metric key, label), in the order a reader looks for them.
ROWS: tuple[tuple[str, str], ...] = (
    ("zeroshot/top1", "zero-shot top-1"),
    ("zeroshot/top5", "zero-shot top-5"),
    *((f"val/image_to_text_R@{k}", f"image->text R@{k}") for k in (1, 5, 10)),
    *((f"val/text_to_image_R@{k}", f"text->image R@{k}") for k in (1, 5, 10)),
    ("val/loss", "validation loss"),
)


def chance_level(metrics: dict, key: str) -> float | None:
    """Accuracy of guessing for zeroshot/topK, from the class count the evaluator recorded."""
    chance_top1 = metrics.get("zeroshot/chance_top1")
    if not chance_top1 or not key.startswith("zeroshot/top"):
        return None
    k = int(key.removeprefix("zeroshot/top"))
    return min(1.0, k * chance_top1)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3f}"


def metrics_table(columns: dict[str, dict]) -> str:
    """Rows of ROWS present in any column, e.g. metrics_table({"before": m0, "after": m1}).

    A column that is empty (not measured) shows '-' throughout.
    """
    rows = [(key, label) for key, label in ROWS if any(key in metrics for metrics in columns.values())]
    if not rows:
        return "(no evaluation metrics)"
    label_width = max(len(label) for _, label in rows)
    width = max(8, *(len(name) for name in columns))
    lines = [" " * label_width + "".join(f"  {name:>{width}}" for name in columns)]
    for key, label in rows:
        cells = "".join(f"  {_cell(metrics.get(key)):>{width}}" for metrics in columns.values())
        chance = next((c for c in (chance_level(m, key) for m in columns.values()) if c is not None), None)
        lines.append(f"{label:<{label_width}}{cells}" + (f"   (chance {chance:.3f})" if chance is not None else ""))
    return "\n".join(lines)


# (task, metric, value, chance level or None): one row of an evaluation suite's results.
SuiteRow = tuple[str, str, float, float | None]
# Suite metrics that count things (images, captions, skipped ones) rather than measure: shown as integers.
COUNT_PREFIXES = ("num_", "skipped_", "captions_dropped")


def _suite_cell(metric: str, value) -> str:
    if metric.rsplit("/", 1)[-1].startswith(COUNT_PREFIXES) and value is not None and not math.isnan(value):
        return str(int(value))
    return _cell(value)


def suite_table(rows: list[SuiteRow], column: str = "value") -> str:
    """A suite's results as aligned text, a row per task metric, the chance level beside accuracies."""
    if not rows:
        return "(no results)"
    task_width = max(4, *(len(task) for task, *_ in rows))
    metric_width = max(6, *(len(metric) for _, metric, *_ in rows))
    width = max(8, len(column))
    lines = [f"{'task':<{task_width}}  {'metric':<{metric_width}}  {column:>{width}}"]
    for task, metric, value, chance in rows:
        line = f"{task:<{task_width}}  {metric:<{metric_width}}  {_suite_cell(metric, value):>{width}}"
        lines.append(line + (f"   (chance {chance:.3f})" if chance is not None else ""))
    return "\n".join(lines)


def suite_markdown(rows: list[SuiteRow], column: str = "value") -> str:
    """The same rows as a Markdown table (README-ready)."""
    lines = [f"| task | metric | {column} | chance |", "| --- | --- | ---: | ---: |"]
    for task, metric, value, chance in rows:
        lines.append(f"| {task} | {metric} | {_suite_cell(metric, value)} | {_cell(chance)} |")
    return "\n".join(lines)
