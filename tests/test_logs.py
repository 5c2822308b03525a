"""The metrics file: rows past a resumed run's checkpoint and lines cut short by a killed run;
the curves drawn from it."""

import json
import math
import subprocess
import sys

import pytest

from tests.helpers import ROOT
from train import logs


def _write(workdir, text):
    (workdir / "metrics.jsonl").write_text(text)


def test_drop_after_keeps_the_rows_up_to_the_checkpoint_and_drops_torn_lines(tmp_path):
    rows = [{"step": s, "train/loss": 1.0 / s} for s in (10, 20, 30)]
    _write(tmp_path, "".join(json.dumps(r) + "\n" for r in rows) + '[1, 2]\n{"step": 4')
    writer = logs.MetricWriter(str(tmp_path), enabled=True)
    writer.drop_after(20)
    assert logs.read_metrics(str(tmp_path)) == rows[:2]
    writer.write(30, {"train/loss": 0.5})
    assert [r["step"] for r in logs.read_metrics(str(tmp_path))] == [10, 20, 30]
    writer.close()


def test_drop_after_ends_a_last_row_without_newline(tmp_path):
    _write(tmp_path, '{"step": 10, "train/loss": 1.0}')
    writer = logs.MetricWriter(str(tmp_path), enabled=True)
    writer.drop_after(10)
    writer.write(20, {"train/loss": 0.5})
    assert [r["step"] for r in logs.read_metrics(str(tmp_path))] == [10, 20]
    writer.close()


def test_eval_metrics_are_the_evaluation_row_of_that_step(tmp_path):
    rows = '{"step": 10, "train/loss": 1.0}\n{"step": 20, "eval/loss": "nan", "eval/acc": 0.5}\n'
    _write(tmp_path, rows + '{"ste')
    writer = logs.MetricWriter(str(tmp_path), enabled=True)
    found = writer.eval_metrics(20)
    assert found["eval/acc"] == 0.5 and math.isnan(found["eval/loss"]) and len(found) == 2
    assert writer.eval_metrics(10) is None and writer.eval_metrics(30) is None
    assert logs.MetricWriter(str(tmp_path), enabled=False).eval_metrics(20) is None
    # Replaced: the train metrics of that step stay, its old evaluation goes.
    _write(
        tmp_path, '{"step": 20, "train/loss": 1.0, "eval/loss": 3.0}\n{"step": 30, "eval/a": 1}\n'
    )
    writer.replace_eval(30, {"eval/a": 0.25})
    writer.replace_eval(20, {"eval/loss": 2.0})
    assert logs.read_metrics(str(tmp_path)) == [
        {"step": 20, "train/loss": 1.0},
        {"step": 30, "eval/a": 0.25},
        {"step": 20, "eval/loss": 2.0},
    ]
    assert writer.eval_metrics(20) == {"eval/loss": 2.0}
    writer.close()


PNG = b"\x89PNG\r\n\x1a\n"


def test_plot_metrics_draws_train_and_eval_series_of_each_metric(tmp_path):
    rows = [
        {"train/loss": 9.0},  # no step: left out
        {"step": 10, "train/loss": 2.0, "train/accuracy": 0.2, "train/steps_per_sec": 5.0},
        {"step": 20, "train/loss": "nan", "eval/loss": 1.5, "eval/accuracy": 0.4},
        {"step": 30, "train/loss": 1.0, "train/learning_rate": 1e-3},
    ]
    _write(tmp_path, "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4')
    out = tmp_path / "curves.png"
    assert logs.plot_metrics(str(tmp_path), str(out)) == ["accuracy", "learning_rate", "loss"]
    assert out.read_bytes()[:8] == PNG
    assert logs.plot_metrics(str(tmp_path), str(out), ["loss"]) == ["loss"]
    with pytest.raises(ValueError, match=r"no metric 'bleu' in .*; it has accuracy, learning"):
        logs.plot_metrics(str(tmp_path), str(out), ["bleu"])
    with pytest.raises(FileNotFoundError, match="is .*other a run's workdir"):
        logs.plot_metrics(str(tmp_path / "other"), str(out))


def test_plot_command_line(tmp_path):
    _write(tmp_path, '{"step": 10, "train/loss": 2.0}\n{"step": 20, "train/loss": 1.0}\n')
    out = tmp_path / "curves.png"
    cmd = [sys.executable, "-m", "train.logs", f"--workdir={tmp_path}", f"--plot={out}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}: loss" in done.stdout and out.read_bytes()[:8] == PNG
    bad = subprocess.run(
        [*cmd, "--metrics", "acc"], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert bad.returncode == 2 and "error: no metric 'acc'" in bad.stderr


def test_one_traceback_per_error_keeps_every_message_and_the_first_traceback():
    """A full disk made several of Orbax's threads log the same error's whole traceback,
    some 300 lines before the application's own one-line error."""
    import io
    import logging

    stream = io.StringIO()
    logger = logging.getLogger("tests.one_traceback_per_error")
    logger.propagate = False
    logger.addHandler(logging.StreamHandler(stream))
    logger.addFilter(logs.OneTracebackPerError())

    def log_error(message, error, wrap=None):
        try:
            try:
                raise error
            except ValueError as e:
                if wrap is None:
                    raise
                raise RuntimeError(wrap) from e
        except (ValueError, RuntimeError):
            logger.exception(message)

    log_error("first thread", ValueError("RESOURCE_EXHAUSTED: disk full"))
    log_error("second thread", ValueError("RESOURCE_EXHAUSTED: disk full"), wrap="commit failed")
    log_error("third thread", ValueError("something else"))
    lines = stream.getvalue().splitlines()
    assert [line for line in lines if "thread" in line] == [
        "first thread",
        "second thread",
        "third thread",
    ]
    assert stream.getvalue().count("Traceback") == 2  # the first error's, and the other's
    second, third = lines.index("second thread"), lines.index("third thread")
    assert lines[second + 1] == "third thread"  # the repeat: its message line only
    assert lines[third + 1].startswith("Traceback") and lines[-1] == "ValueError: something else"
