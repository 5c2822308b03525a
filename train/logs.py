"""Metrics to `workdir/metrics.jsonl` (always) and TensorBoard (with the extra installed).

One JSON object per line: `{"step": 100, "train/loss": 0.31, ...}`. Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from typing import Any


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = None
        if not enabled:
            return
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            SummaryWriter = None  # noqa: N806 - optional extra
        if SummaryWriter is not None:
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

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

    def drop_after(self, step: int) -> None:
        """Removes the rows past `step` (and lines cut short), where a run resumes from its
        checkpoint at `step`: a run killed outright (no SIGTERM) had logged steps it will now
        run again, which would otherwise get a second row each."""
        if not self.enabled or not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        kept = [
            line if line.endswith("\n") else line + "\n"
            for line, row in _parsed(lines)
            if row.get("step", 0) <= step
        ]
        if kept != lines:
            from train.tasks import write_text_atomically

            write_text_atomically(self.path, "".join(kept))

    def has_eval(self, step: int) -> bool:
        """Whether the file has evaluation metrics for `step` (False where not writing)."""
        if not self.enabled or not os.path.exists(self.path):
            return False
        with open(self.path) as f:
            return any(
                row.get("step") == step and any(k.startswith("eval/") for k in row)
                for _, row in _parsed(f)
            )

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


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The rows of `workdir/metrics.jsonl`."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
