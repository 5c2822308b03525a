"""Metrics to `workdir/metrics.jsonl` (always) and TensorBoard (with the extra installed).

One JSON object per line: `{"step": 100, "train/loss": 0.31, ...}`. Only process 0 writes.

The curves of a run, drawn from that file (matplotlib: the `plot` extra):

    python -m train.logs --workdir=DIR --plot=curves.png [--metrics loss accuracy]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class OneTracebackPerError(logging.Filter):
    """A logger filter that leaves each error's traceback to the first record of it: later
    records of the same error keep their message line. A background checkpoint save that
    fails (a full disk) is logged by several of Orbax's threads, each with the whole
    traceback of the same error, pages before the application's own one-line error. The
    error is the innermost one of the record's exception (its cause or context), by type
    and message."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is None:
            return True
        for _ in range(100):  # (a chain may loop)
            inner = error.__cause__ or error.__context__
            if inner is None:
                break
            error = inner
        key = (type(error).__name__, str(error))
        if key in self._seen:
            record.exc_info, record.exc_text = None, None
        self._seen.add(key)
        return True


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, METRICS_FILE)
        self._tb = None
        if not enabled:
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            SummaryWriter = None  # noqa: N806 - optional extra
        if SummaryWriter is not None:
            self._tb = SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in metrics.items():
            v = float(v)
            row[k] = v if math.isfinite(v) else str(v)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                self._tb.add_scalar(k, float(v), step)
            self._tb.flush()

    def _rewrite(self, edit: Callable[[dict[str, Any]], dict[str, Any] | None]) -> None:
        """Rewrites the file (atomically, only if anything changes) with each row as `edit`
        returns it: None drops it, the same row keeps its line. Lines cut short by a killed
        run are dropped."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        kept = []
        for line, row in _parsed(lines):
            new = edit(row)
            if new is None:
                continue
            if new is not row:
                line = json.dumps(new) + "\n"
            kept.append(line if line.endswith("\n") else line + "\n")
        if kept != lines:
            from train.tasks import write_text_atomically

            write_text_atomically(self.path, "".join(kept))

    def drop_after(self, step: int) -> None:
        """Removes the rows past `step` (and lines cut short), where a run resumes from its
        checkpoint at `step`: a run killed outright (no SIGTERM) had logged steps it will now
        run again, which would otherwise get a second row each."""
        self._rewrite(lambda row: row if row.get("step", 0) <= step else None)

    def eval_metrics(self, step: int) -> dict[str, float] | None:
        """The evaluation metrics the file holds for `step`, if any (None where not
        writing)."""
        return logged_eval(self.path, step) if self.enabled else None

    def replace_eval(self, step: int, metrics: dict[str, Any]) -> None:
        """Writes `metrics` as `step`'s evaluation in place of the one the file holds (one
        of another config, e.g. another dtype): a later resume then reads these."""

        def without_eval(row: dict[str, Any]) -> dict[str, Any] | None:
            if row.get("step") != step or not any(k.startswith("eval/") for k in row):
                return row
            rest = {k: v for k, v in row.items() if not k.startswith("eval/")}
            return None if set(rest) == {"step"} else rest

        self._rewrite(without_eval)
        self.write(step, metrics)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _parsed(lines: Iterable[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The lines that hold a row, each with its row: lines cut short by a killed run (or
    anything else that is not a JSON object) are skipped."""
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            yield line, row


def logged_eval(path: str, step: int) -> dict[str, float] | None:
    """The evaluation metrics the metrics file `path` holds for `step`, if any."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        for _, row in _parsed(f):
            if row.get("step") == step:
                found = {k: float(v) for k, v in row.items() if k.startswith("eval/")}
                if found:
                    return found
    return None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The rows of `workdir/metrics.jsonl`."""
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


MATPLOTLIB_MISSING = (
    'plotting needs matplotlib, which is not installed: pip install -e ".[plot]" '
    "(or read metrics.jsonl as it is)"
)
_NOT_DRAWN = {"steps_per_sec"}  # a speed, not a curve of the model


def plot_metrics(workdir: str, path: str, metrics: Sequence[str] | None = None) -> list[str]:
    """Draws the run's curves into the image `path`: one panel per metric name, its
    `train/` and `eval/` series together (non-finite values left out). Returns the
    metric names drawn.

    Args:
      metrics: names without the prefix, e.g. ["loss", "accuracy"]; None: all but speed.

    Raises:
      FileNotFoundError: `workdir` has no metrics.jsonl.
      ValueError: a requested metric is in no row, or there is nothing to draw.
    """
    file = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{file} does not exist: is {workdir} a run's workdir?")
    with open(file) as f:
        rows = [row for _, row in _parsed(f)]
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for row in rows:
        if not isinstance(row.get("step"), int):
            continue
        for key, value in row.items():
            split, _, name = key.partition("/")
            if not name or not isinstance(value, int | float) or not math.isfinite(value):
                continue
            series.setdefault(name, {}).setdefault(split, []).append((row["step"], value))
    if metrics is None:
        names = sorted(n for n in series if n not in _NOT_DRAWN)
    else:
        missing = [m for m in metrics if m not in series]
        if missing:
            raise ValueError(
                f"no metric {', '.join(map(repr, missing))} in {file}; it has "
                f"{', '.join(sorted(series)) or 'none'}"
            )
        names = list(metrics)
    if not names:
        raise ValueError(f"{file} holds no metrics to draw yet")
    try:
        from matplotlib.figure import Figure  # no pyplot: the process's backend is left alone
    except ImportError:
        raise ImportError(MATPLOTLIB_MISSING) from None
    cols = min(len(names), 3)
    nrows = math.ceil(len(names) / cols)
    fig = Figure(figsize=(4.5 * cols, 3.2 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        for split, points in sorted(series[name].items()):
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="." if len(points) < 30 else None, label=split)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.legend()
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_visible(False)
    fig.suptitle(os.path.basename(os.path.normpath(workdir)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return names


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m train.logs", description="Draws a run's curves from its metrics.jsonl."
    )
    parser.add_argument("--workdir", required=True, help="the run's --workdir")
    parser.add_argument("--plot", required=True, metavar="FILE.png", help="the image to write")
    parser.add_argument("--metrics", nargs="+", help="names without train/ or eval/ (default: all)")
    args = parser.parse_args(argv)
    try:
        names = plot_metrics(args.workdir, args.plot, args.metrics)
    except (OSError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.plot}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
