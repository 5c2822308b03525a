"""The metrics file: rows past a resumed run's checkpoint and lines cut short by a killed run."""

import json

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


def test_has_eval_looks_for_evaluation_metrics_at_that_step(tmp_path):
    _write(tmp_path, '{"step": 10, "train/loss": 1.0}\n{"step": 20, "eval/loss": 2.0}\n{"ste')
    writer = logs.MetricWriter(str(tmp_path), enabled=True)
    assert writer.has_eval(20) and not writer.has_eval(10) and not writer.has_eval(30)
    assert not logs.MetricWriter(str(tmp_path), enabled=False).has_eval(20)
    writer.close()
