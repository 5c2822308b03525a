"""The table, the JSON file and the plot. Pure Python (matplotlib imported only for --plot)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from benchmarks import specs

MATPLOTLIB_MISSING = (
    "--plot needs matplotlib, which is not installed: pip install matplotlib "
    "(or drop --plot; --json keeps the numbers)"
)

__all__ = ["COLUMNS", "add_ratios", "format_table", "plot", "sort_rows", "write_json"]


def _sig(v: float, digits: int = 3) -> str:
    """`v` with about `digits` significant digits, thousands separated, never scientific."""
    if v == 0 or not math.isfinite(v):
        return f"{v:g}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(v))))
    return f"{v:,.{decimals}f}"


def _fixed(decimals: int) -> Callable[[float], str]:
    return lambda v: f"{v:.{decimals}f}"


# (row key, column title, number format)
COLUMNS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("workload", "workload", str),
    ("impl", "impl", str),
    ("device", "device", str),
    ("precision", "precision", str),
    ("batch", "batch", str),
    ("shape", "shape", str),
    ("step_ms", "step ms", _sig),
    ("items_per_s", "items/s", _sig),
    ("tokens_per_s", "tokens/s", _sig),
    ("tflops", "TFLOP/s", _sig),
    ("mfu_pct", "MFU %", _sig),
    ("first_step_s", "first step s", _sig),
    ("compile_s", "compile s", _sig),
    ("peak_mem_gib", "peak mem GiB", _fixed(2)),
    ("ours_per_peer", "ours/peer", lambda v: f"{v:.2f}x"),
    ("note", "note", str),
]


def _note(row: dict[str, Any]) -> str:
    note = row.get("note") or ""
    if row.get("status") in ("skipped", "failed", "stopped"):
        return f"{row['status']}: {note}" if note else row["status"]
    return note


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as an aligned plain-text table (blank where a value is unknown)."""
    cells = [[title for _, title, _ in COLUMNS]]
    for row in rows:
        line = []
        for key, _, fmt in COLUMNS:
            value = _note(row) if key == "note" else row.get(key)
            line.append("" if value is None or value == "" else fmt(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(COLUMNS))]
    numeric = {k for k, _, f in COLUMNS if f is not str}

    def render(line: list[str]) -> str:
        parts = []
        for (key, _, _), cell, width in zip(COLUMNS, line, widths, strict=True):
            parts.append(cell.rjust(width) if key in numeric else cell.ljust(width))
        return "  ".join(parts).rstrip()

    out = [render(cells[0]), render(["-" * w for w in widths])]
    out += [render(line) for line in cells[1:]]
    return "\n".join(out)


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Sets `ours_per_peer` on each measured peer row: our best items/s for the workload over
    the peer's items/s (above 1: ours is faster). Only our implementations that do the
    peers' work count (not `specs.NOT_THE_PEERS_WORK`: BERT without attention dropout, the
    stock-Flax LSTM)."""
    best: dict[str, float] = {}
    for row in rows:
        impl = str(row.get("impl", "")).split()
        if impl[1:] and impl[1] in specs.NOT_THE_PEERS_WORK:
            continue
        if row.get("framework") == "jax" and row.get("items_per_s"):
            best[row["workload"]] = max(best.get(row["workload"], 0.0), row["items_per_s"])
    for row in rows:
        if row.get("framework") != "jax" and row.get("items_per_s") and row["workload"] in best:
            row["ours_per_peer"] = best[row["workload"]] / row["items_per_s"]


def sort_rows(rows: list[dict[str, Any]], order: list[str]) -> list[dict[str, Any]]:
    """Rows grouped by workload (in `order`), ours first, then the peers."""
    position = {name: i for i, name in enumerate(order)}
    frameworks = {"jax": 0, "torch": 1, "keras": 2}
    return sorted(
        rows,
        key=lambda r: (
            position.get(r["workload"], len(position)),
            frameworks.get(r.get("framework"), len(frameworks)),
        ),
    )


def write_json(path: str, rows: list[dict[str, Any]], metadata: dict[str, Any]) -> None:
    """`{"metadata": {...}, "rows": [...]}`; rows are dicts with the table's keys."""
    with open(path, "w") as f:
        json.dump({"metadata": metadata, "rows": rows}, f, indent=1)
        f.write("\n")


def plot(path: str, rows: list[dict[str, Any]], title: str) -> None:
    """Horizontal bars of items/s per workload, ours beside each peer (log scale)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.patches
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit(MATPLOTLIB_MISSING) from None
    measured = [r for r in rows if r.get("items_per_s")]
    if not measured:
        raise SystemExit("--plot: no measured rows to plot")
    colors = {"jax": "tab:blue", "torch": "tab:orange", "keras": "tab:red"}
    labels = [f"{r['workload']}  {r['impl']}" for r in measured]
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(measured) + 1.5))
    y = list(range(len(measured)))[::-1]
    ax.barh(
        y,
        [r["items_per_s"] for r in measured],
        color=[colors.get(r.get("framework"), "tab:gray") for r in measured],
    )
    ax.set_yticks(y, labels)
    frameworks = dict.fromkeys(r.get("framework") for r in measured)
    ax.legend(
        handles=[
            matplotlib.patches.Patch(color=colors.get(f, "tab:gray"), label=f) for f in frameworks
        ],
        loc="lower right",
    )
    ax.set_xscale("log")
    ax.set_xlabel("items/s (higher is better)")
    ax.set_title(title)
    for yi, r in zip(y, measured, strict=True):
        ax.annotate(f" {_sig(r['items_per_s'])}", (r["items_per_s"], yi), va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
