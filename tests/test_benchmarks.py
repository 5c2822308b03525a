"""Benchmarks: the FLOP counter against hand counts, the CLI end to end, the peer process."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from benchmarks import flops, report, specs, timing
from benchmarks.errors import UsageError
from jaxmodels import cnn, rnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED_CNN_FORWARD = 5_262_080  # SeedCNN forward FLOPs per 28x28x1 image, counted by hand below


def _shape(*dims: int, dtype=jnp.float32) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(dims, dtype)


def _env() -> dict[str, str]:
    """One CPU device for the benchmark processes (pytest's 8 simulated ones are not needed)."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f
    )
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _run(*args: str, timeout: float = 120, status: int = 0) -> subprocess.CompletedProcess:
    """`python -m ARGS`, which must exit with `status`."""
    proc = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == status, (
        f"{args}: status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    return proc


# --- FLOP counter -------------------------------------------------------------------------------


def test_dense_flops():
    # [4, 3] @ [3, 5]: 2 * 4 * 3 * 5; the bias add is elementwise and not counted.
    assert flops.forward_flops(nn.Dense(5), _shape(4, 3), train_kwarg=False) == 120


def test_conv_flops():
    # VALID 3x3 over 8x8 -> [2, 6, 6, 4]: 2 * (2*6*6*4) outputs * 9 taps * 3 input features.
    conv = nn.Conv(4, (3, 3), padding="VALID")
    assert flops.forward_flops(conv, _shape(2, 8, 8, 3), train_kwarg=False) == 2 * 288 * 9 * 3
    # Grouped: each output sees 6 / 3 = 2 input features.
    grouped = nn.Conv(6, (3, 3), padding="VALID", feature_group_count=3)
    assert flops.forward_flops(grouped, _shape(2, 8, 8, 6), train_kwarg=False) == 2 * 432 * 9 * 2


def test_lstm_scan_flops():
    b, t, f, h = 2, 5, 3, 4
    count = flops.forward_flops(rnn.LSTM(h, backend="scan"), _shape(b, t, f), train_kwarg=False)
    # One input projection for all steps, then t recurrent matmuls inside the scan.
    assert count == 2 * b * t * f * 4 * h + t * 2 * b * h * 4 * h


def test_control_flow_flops():
    w = jnp.ones((3, 3))

    def fn(x):
        x, _ = jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=7)  # 7 matmuls
        x = jax.lax.cond(x.sum() > 0, lambda c: (c @ w) @ w, lambda c: c, x)  # max branch: 2
        x = jax.checkpoint(lambda c: jax.nn.relu(c) @ w)(x)  # remat + custom_jvp inside: 1
        return jax.lax.while_loop(lambda c: c.sum() < 3, lambda c: c @ w, x)  # body once: 1

    one = 2 * 2 * 3 * 3
    assert flops.jaxpr_flops(fn, _shape(2, 3)) == (7 + 2 + 1 + 1) * one


def test_seed_cnn_flops_by_hand():
    by_hand = (
        2 * 26 * 26 * 32 * 9 * 1  # conv 1
        + 2 * 11 * 11 * 64 * 9 * 32  # conv 2
        + 2 * 1600 * 128  # dense 1
        + 2 * 128 * 10  # dense 2
    )
    assert by_hand == SEED_CNN_FORWARD
    assert flops.forward_flops(cnn.SeedCNN(), _shape(3, 28, 28, 1)) == 3 * by_hand


def test_embedding_gather_counts_zero():
    model = rnn.LSTMClassifier(50, 8, 16, 1, 3, backend="scan")
    tokens, lengths = _shape(2, 5, dtype=jnp.int32), _shape(2, dtype=jnp.int32)
    expected = 2 * 2 * 5 * 8 * 64 + 5 * 2 * 2 * 16 * 64 + 2 * 2 * 16 * 3
    assert flops.forward_flops(model, tokens, lengths) == expected


def _cpu_workloads() -> dict[str, specs.Workload]:
    return {w.name: w for w in specs.SUITES["cpu"]}


def _transformer_flops_by_hand(w: specs.Workload) -> int:
    """Forward FLOPs of a BERT / decoder-only LM workload: every matmul, attention included
    (QK^T and PV over the full seq x seq, also when causal); the MLM head on the P masked
    slots only; embedding look-ups 0."""
    b, t = w.batch, w.seq_len
    if w.family == "bert":
        layers, h, _ = specs.BERT_PRESETS[w.model["preset"]]
        mlp, vocab, slots = 4 * h, specs.BERT_VOCAB, w.model["max_predictions"]
        heads = 2 * b * h * h + 2 * b * h * 2  # pooler, NSP
        heads += 2 * b * slots * h * h + 2 * b * slots * h * vocab  # MLM transform, decoder
    else:
        m = w.model
        layers, h, mlp, vocab = m["num_layers"], m["embed_dim"], m["mlp_dim"], m["vocab_size"]
        heads = 2 * b * t * h * vocab  # tied output projection on every position
    per_layer = (
        4 * 2 * b * t * h * h  # Q, K, V, output projections
        + 2 * 2 * b * t * h * mlp  # MLP
        + 2 * 2 * b * t * t * h  # QK^T and (weights)V
    )
    return layers * per_layer + heads


@pytest.mark.parametrize("name", ["bert_base", "bert_large", "transformer_lm"])
def test_transformer_flops_by_hand(name):
    from benchmarks import workloads

    w = _cpu_workloads()[name]
    built = workloads.BUILDERS[w.family](w, "")
    inputs = [_shape(*x.shape, dtype=x.dtype) for x in built.model_inputs()]
    # Counted on the XLA attention (cuDNN attention is a custom call without matmuls).
    model = built.flops_model.config if w.family == "bert" else built.flops_model
    assert model.implementation == "xla"
    assert flops.forward_flops(built.flops_model, *inputs) == _transformer_flops_by_hand(w)


def test_bert_presets_match_the_model():
    from jaxmodels import bert

    for name, sizes in specs.BERT_PRESETS.items():
        assert bert.PRESETS[name] == sizes
        config = bert.BertConfig.preset(name)
        assert config.intermediate_size == 4 * sizes[1]
        assert config.vocab_size == specs.BERT_VOCAB
        assert config.max_position_embeddings == specs.BERT_MAX_POSITIONS


# --- report -------------------------------------------------------------------------------------


def test_ratios_and_table():
    rows = [
        {"workload": "a", "impl": "torch eager", "framework": "torch", "items_per_s": 50.0},
        {"workload": "a", "impl": "jax scan", "framework": "jax", "items_per_s": 100.0},
        {"workload": "a", "impl": "jax cudnn", "framework": "jax", "items_per_s": 150.0},
        {"workload": "b", "impl": "jax", "framework": "jax", "status": "skipped", "note": "why"},
        {"workload": "a", "impl": "keras jax", "framework": "keras", "items_per_s": 300.0},
        # Not the peers' work: left out of "our best" (was counted).
        {"workload": "a", "impl": "jax flax_rnn", "framework": "jax", "items_per_s": 900.0},
    ]
    rows = report.sort_rows(rows, ["a", "b"])
    report.add_ratios(rows)
    impls = [r["impl"] for r in rows]
    assert impls == ["jax scan", "jax cudnn", "jax flax_rnn", "torch eager", "keras jax", "jax"]
    del rows[2]
    assert rows[2]["ours_per_peer"] == pytest.approx(3.0)
    assert rows[3]["ours_per_peer"] == pytest.approx(0.5)
    table = report.format_table(rows)
    assert "3.00x" in table and "skipped: why" in table


# --- the command line ---------------------------------------------------------------------------


def test_imports_stay_light():
    code = (
        "import sys, benchmarks.peers;"
        "assert 'jax' not in sys.modules, 'the peer process must not import JAX';"
        "import benchmarks.cli, benchmarks.measure, benchmarks.workloads;"
        "heavy = {'torch', 'torchvision', 'transformers', 'matplotlib', 'grain', 'keras',"
        " 'tensorflow_datasets', 'ml_collections', 'train'} & set(sys.modules);"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), check=True, timeout=60)


def test_cli_writes_rows(tmp_path):
    out = tmp_path / "rows.json"
    proc = _run(
        "benchmarks",
        "--suite",
        "cpu",
        "--only",
        "mnist_cnn",
        "lstm_article",
        "--steps",
        "2",
        "--windows",
        "2",
        "--json",
        str(out),
        "--plot",
        str(tmp_path / "rows.png"),
    )
    assert (tmp_path / "rows.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # matplotlib
    data = json.loads(out.read_text())
    assert data["metadata"]["suite"] == "cpu"
    assert data["metadata"]["command"].startswith("python -m benchmarks --suite cpu")
    rows = {(r["workload"], r["impl"]): r for r in data["rows"]}
    assert set(rows) == {
        ("mnist_cnn", "jax"),
        ("lstm_article", "jax scan"),
        ("lstm_article", "jax flax_rnn"),
    }
    # The stock-Flax baseline is the same function: the same FLOP count as ours.
    assert (
        rows[("lstm_article", "jax flax_rnn")]["forward_flops"]
        == rows[("lstm_article", "jax scan")]["forward_flops"]
    )
    for row in rows.values():
        assert row["status"] == "ok", row
        assert row["device"] == "cpu x1"
        assert row["items_per_s"] > 0 and row["step_ms"] > 0 and row["tflops"] > 0
        assert len(row["window_ms"]) == 2
        assert row["model_flops_per_step"] == 3 * row["forward_flops"] > 0
        assert row["mfu_pct"] is None  # no peak FLOP/s known for a CPU
    mnist = rows[("mnist_cnn", "jax")]
    w = {x.name: x for x in specs.SUITES["cpu"]}
    assert mnist["forward_flops"] == w["mnist_cnn"].batch * SEED_CNN_FORWARD
    lstm = rows[("lstm_article", "jax scan")]
    assert lstm["tokens_per_s"] == pytest.approx(lstm["items_per_s"] * w["lstm_article"].seq_len)
    assert "mnist_cnn" in proc.stdout and "items/s" in proc.stdout


def test_cli_transformer_rows(tmp_path):
    out = tmp_path / "rows.json"
    _run(
        "benchmarks",
        "--suite",
        "cpu",
        "--only",
        "bert_base",
        "transformer_lm",
        "--steps",
        "1",
        "--windows",
        "1",
        "--warmup",
        "0",
        "--in-process",
        "--step-rng",
        "rbg",
        "--batch",
        "2",
        "--set",
        "scan_layers=True",
        "--json",
        str(out),
    )
    result = json.loads(out.read_text())
    assert result["metadata"]["step_rng"] == "rbg"
    assert result["metadata"]["model_overrides"] == {"scan_layers": True}
    assert result["metadata"]["batch_override"] == 2
    rows = {(r["workload"], r["impl"]): r for r in result["rows"]}
    assert set(rows) == {
        ("bert_base", "jax"),
        ("bert_base", "jax no_attn_dropout"),
        ("transformer_lm", "jax"),
    }
    # --batch and --set apply: the scanned layers count the same FLOPs as the unrolled ones.
    w = {k: dataclasses.replace(v, batch=2) for k, v in _cpu_workloads().items()}
    for (name, _), row in rows.items():
        assert row["status"] == "ok", row
        assert row["batch"] == 2 and "scan_layers=True" in row["note"]
        assert row["precision"] == "bfloat16"
        assert row["forward_flops"] == _transformer_flops_by_hand(w[name]) > 0
        assert row["model_flops_per_step"] == 3 * row["forward_flops"]
        assert row["tflops"] > 0 and row["items_per_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["items_per_s"] * w[name].seq_len)
    assert rows["bert_base", "jax"]["note"] == (
        "MLM on 5 of 32 tokens (5 slots); scan_layers=True; dropout bits: rbg"
    )
    assert "dropout 0" in rows["bert_base", "jax no_attn_dropout"]["note"]


def test_xla_flags_reach_the_workload_process(tmp_path):
    """--xla-flags: appended to XLA_FLAGS of our workload processes (here XLA dumps its HLO),
    noted in the rows; refused with --in-process, where XLA has started already."""
    out, dump = tmp_path / "rows.json", tmp_path / "dump"
    args = ["--suite", "cpu", "--only", "mnist_cnn", "--steps", "1", "--windows", "1"]
    _run("benchmarks", *args, f"--xla-flags=--xla_dump_to={dump}", "--json", str(out))
    [row] = json.loads(out.read_text())["rows"]
    assert row["status"] == "ok" and f"XLA_FLAGS --xla_dump_to={dump}" in row["note"]
    assert any(name.endswith("after_optimizations.txt") for name in os.listdir(dump))
    proc = _run("benchmarks", *args, "--in-process", "--xla-flags=--x=1", status=2)
    assert "drop --in-process" in proc.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--windows", "-1"], "--windows must be >= 1, got -1"),
        (["--warmup", "-1"], "--warmup must be >= 0, got -1"),
        (["--peak-tflops", "0"], "--peak-tflops must be > 0"),
        (["--devices", "foo"], "--devices takes a count"),
        (["--devices", "2", "--peers"], "--peers runs on one device"),  # ratios of 2 to 1
        (["--timeout", "0"], "--timeout must be > 0"),  # was: "probe timed out after 0 s"
        # were: a traceback after every workload had been measured
        (["--json", "/nonexistent/rows.json"], "--json /nonexistent/rows.json: there is no fo"),
        (["--plot", "/nonexistent/rows.png"], "--plot /nonexistent/rows.png: there is no fo"),
    ],
)
def test_bad_numbers_fail_before_anything_runs(flags, message, monkeypatch):
    """Zero steps was taken for "the default", a negative count failed in every workload
    process, one by one: now each is refused at once, naming the flag."""
    from benchmarks import cli

    def no_run(args):
        raise AssertionError("the suite started")

    monkeypatch.setattr(cli, "_run_suite", no_run)
    with pytest.raises(SystemExit, match=message):
        cli.main(["--suite", "cpu", "--only", "mnist_cnn", *flags])


def test_outputs_that_cannot_be_written_are_refused_before_anything_runs(tmp_path, monkeypatch):
    """Were: a traceback after every workload had been measured (a folder as --json, a
    .txt plot, a file in /proc), or the plot written under another name than asked
    (matplotlib adds .png to a name without an ending); a file as --profile failed every
    workload after timing it. A file that is there is left as it is, and nothing is left
    where there was none."""
    from benchmarks import cli

    def no_run(args):
        raise AssertionError("the suite started")

    monkeypatch.setattr(cli, "_run_suite", no_run)
    kept = tmp_path / "kept.json"
    kept.write_text("kept")
    cases = [
        (["--json", str(tmp_path)], f"--json {tmp_path} is a folder"),
        (
            ["--plot", str(tmp_path / "rows.txt")],
            "rows.txt: give a file name ending in one of ",
        ),
        (["--plot", str(tmp_path / "rows")], "rows: give a file name ending in one of "),
        (["--profile", str(kept)], f"--profile {kept} is a file"),
    ]
    if os.path.isdir("/proc"):
        cases.append((["--json", "/proc/rows.json"], "--json /proc/rows.json cannot be written"))
    for flags, message in cases:
        with pytest.raises(SystemExit, match=re.escape(message)):
            cli.main(["--suite", "cpu", "--only", "mnist_cnn", *flags])
    nowhere = tmp_path / "nowhere.json"
    nowhere.symlink_to(tmp_path / "missing" / "target.json")
    for flags in (
        ["--json", str(kept)],
        ["--plot", str(tmp_path / "rows.PNG")],
        ["--plot", str(tmp_path / "rows.pdf")],
        ["--json", str(nowhere)],  # was: the link removed, its target made
    ):
        with pytest.raises(AssertionError, match="the suite started"):
            cli.main(["--suite", "cpu", "--only", "mnist_cnn", *flags])
    assert sorted(os.listdir(tmp_path)) == ["kept.json", "nowhere.json"]
    assert kept.read_text() == "kept" and nowhere.is_symlink()


def test_a_profile_that_fails_keeps_the_timed_row(tmp_path, monkeypatch):
    """Was: the workload's row marked failed, its timings thrown away."""
    from benchmarks import measure, profile

    def broken(*args, **kwargs):
        raise OSError("no room")

    monkeypatch.setattr(profile, "profile_step", broken)
    w = specs.suite("cpu", ["mnist_cnn"], None)[0]
    row = measure.measure(w, "", jax.devices()[:1], 1, 1, 0, profile_dir=str(tmp_path))
    assert row["step_ms"] > 0 and not row.get("profile")
    assert row["note"].endswith("profile failed: OSError: no room")


def test_a_failed_workload_makes_the_exit_status_1(monkeypatch, capsys):
    """Was 0 whatever failed, so a script could not tell."""
    from benchmarks import cli

    info = cli._probe(cli._parser().parse_args(["--suite", "cpu", "--only", "mnist_cnn"]))
    w = specs.suite("cpu", ["mnist_cnn"], None)[0]
    failed = timing.empty_row(w, "jax", "jax", status="failed", note="boom")
    monkeypatch.setattr(cli, "_run_suite", lambda args: (info, [failed], None))
    assert cli.main(["--suite", "cpu", "--only", "mnist_cnn"]) == 1
    assert "failed: boom" in capsys.readouterr().out
    ok = dict(failed, status="ok", step_ms=1.0, items_per_s=1.0)
    monkeypatch.setattr(cli, "_run_suite", lambda args: (info, [ok], None))
    assert cli.main(["--suite", "cpu", "--only", "mnist_cnn"]) == 0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--only", "mnist_cnnn"], "unknown workload(s) ['mnist_cnnn'] for --only"),
        (["--only", "mnist_cnn", "--steps", "0"], "--steps must be >= 1, got 0"),
        # refused in the probe process, which knows the machine: a refusal all the same
        (["--only", "mnist_cnn", "--impls", "palas"], "--impls palas: no such implementation"),
        (["--only", "mnist_cnn", "--devices", "2"], "--devices 2: this machine has 1 device(s)"),
        # were failed workloads, found in each workload's process
        (["--only", "mnist_cnn", "--set", "foo=1"], "--set foo: mnist_cnn has no such model"),
        # was measured as the scanned model: "maybe" (or "false") a true string
        (
            ["--only", "bert_base", "--set", "scan_layers=maybe"],
            "--set scan_layers='maybe': bert_base's scan_layers is a bool (here False)",
        ),
        (["--only", "mnist_cnn", "--xla-flags=--xla_bogus=1"], "--xla-flags --xla_bogus=1: XLA"),
    ],
)
def test_a_command_line_that_cannot_run_exits_2(flags, message):
    """Was status 1, as for a failed workload, so a script could not tell a command line to
    fix from a measurement that failed; a refusal in the probe process read "the JAX probe
    process failed"."""
    args = ["--suite", "cpu", "--steps", "1", "--windows", "1", *flags]
    proc = _run("benchmarks", *args, status=2)
    assert f"python -m benchmarks: error: {message}" in proc.stderr
    assert "probe process failed" not in proc.stderr


def _children(pid: int) -> dict[int, list[str]]:
    """`pid`'s child processes (Linux's /proc): pid -> command line."""
    found = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline") as f:
                cmdline = f.read().split("\0")
        except (OSError, IndexError):  # gone meanwhile
            continue
        if parent == pid:
            found[int(entry)] = cmdline
    return found


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process table in /proc")
def test_sigterm_kills_the_running_workload_and_reports_what_was_measured(tmp_path):
    """Was: the suite died at once, its workload process (a session of its own) went on
    running on the device while whatever ran next was measured, and no JSON was written."""
    import signal
    import time

    out = tmp_path / "rows.json"
    argv = ["--suite", "cpu", "--only", "mnist_cnn", "lstm_article", "--impls", "default"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks", *argv, "--json", str(out)],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        workers: list[int] = []
        deadline = time.monotonic() + 60
        while not workers and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            workers = [
                pid
                for pid, cmdline in _children(proc.pid).items()
                if "--worker" in cmdline and "--probe" not in cmdline
            ]
        assert workers, "no workload process started"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGTERM, stderr  # ended by the signal, as a shell sees
    assert not os.path.exists(f"/proc/{workers[0]}"), "the workload process was left running"
    assert "stopped by SIGTERM; the rows above are what was measured before" in stderr
    data = json.loads(out.read_text())
    assert data["metadata"]["stopped_by"] == "SIGTERM"
    rows = {r["workload"]: r for r in data["rows"]}
    assert rows["mnist_cnn"]["status"] == "stopped"
    assert rows["mnist_cnn"]["note"] == "SIGTERM while it ran"
    assert rows["lstm_article"]["note"] == "SIGTERM before it ran"
    assert "stopped: SIGTERM before it ran" in stdout


def test_a_stop_signal_is_raised_only_where_the_suite_can_act_on_it():
    """Was raised wherever Python ran next: between starting a workload process and waiting
    on it (which then went on running), or in the middle of the bookkeeping of rows."""
    import signal

    from benchmarks import cli

    request = cli._StopRequest()
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with request.handling():
        os.kill(os.getpid(), signal.SIGTERM)  # not waiting: only noted
        assert request.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN  # `timeout` sends it twice
        with pytest.raises(cli.Stopped, match="SIGTERM"):
            request.check()
        with pytest.raises(cli.Stopped), request.interruptible():
            pass
    assert {s: signal.getsignal(s) for s in before} == before
    with request.handling(), pytest.raises(cli.Stopped, match="SIGINT"), request.interruptible():
        os.kill(os.getpid(), signal.SIGINT)  # waiting: at once
        pytest.fail("not raised")
    # A Ctrl-C ignored from the start (a script's background job) stays ignored.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with request.handling():
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGTERM)  # was: made Ctrl-C Python's own again
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before[signal.SIGINT])


def test_a_batch_that_does_not_split_over_the_devices_is_refused_at_once():
    """Was found in each workload's own process, one failed row after another."""
    from benchmarks import cli

    args = cli._parser().parse_args(["--suite", "cpu", "--only", "mnist_cnn", "--batch", "3"])
    args.devices = "2"  # this test process has 8 simulated devices
    with pytest.raises(UsageError, match="batch 3 is not divisible by the 2 devices"):
        cli._probe(args)


def test_in_process_a_failed_workload_is_its_row_and_the_others_go_on(monkeypatch, tmp_path):
    """Was: the exception ended the run, the other rows and the JSON file lost."""
    from benchmarks import cli, measure

    def fake(w, impl, devices, *args, **kwargs):
        if w.name == "mnist_cnn":
            raise RuntimeError("boom\nsecond line")
        return dict(timing.empty_row(w, "jax", "jax"), step_ms=1.0, items_per_s=1.0)

    monkeypatch.setattr(measure, "measure", fake)
    out = tmp_path / "rows.json"
    argv = ["--suite", "cpu", "--only", "mnist_cnn", "lstm_article", "--impls", "default"]
    assert cli.main([*argv, "--in-process", "--json", str(out)]) == 1
    rows = {r["workload"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["mnist_cnn"]["status"] == "failed"
    assert rows["mnist_cnn"]["note"] == "RuntimeError: boom"
    assert rows["lstm_article"]["status"] == "ok" and rows["lstm_article"]["impl"] == "jax"


def test_impls_default_is_each_workloads_first_implementation():
    """Was: the LSTMs (implementations scan, flax_rnn, ...) were left out without a word."""
    from benchmarks import cli

    args = cli._parser().parse_args(["--suite", "cpu", "--impls", "default"])
    jobs = cli._probe(args)["jobs"]
    assert ("lstm_article", "scan") in jobs and ("mnist_cnn", "") in jobs
    assert ("lstm_article", "flax_rnn") not in jobs


def test_every_workloads_settings_hold_its_own_and_the_documented_ones():
    from benchmarks import workloads

    for w in specs.SUITES["gpu"]:
        names = workloads.settings(w)
        assert set(w.model) <= set(names) and "dtype" not in names, w.name
    (bert_base,) = specs.suite("gpu", ["bert_base"])
    assert {"scan_layers", "remat_policy", "hidden_dropout"} <= set(workloads.settings(bert_base))


def test_the_json_says_the_peer_process_failed(monkeypatch, tmp_path):
    """Was: only a line under the table; the file read as a run without --peers."""
    from benchmarks import cli

    info = cli._probe(cli._parser().parse_args(["--suite", "cpu", "--only", "mnist_cnn"]))
    w = specs.suite("cpu", ["mnist_cnn"], None)[0]
    ok = dict(timing.empty_row(w, "jax", "jax"), step_ms=1.0, items_per_s=1.0)
    monkeypatch.setattr(cli, "_run_suite", lambda args: (info, [ok], None))
    monkeypatch.setattr(cli, "_run_peers", lambda *a: ([], "peer process failed: boom"))
    out = tmp_path / "rows.json"
    assert cli.main(["--suite", "cpu", "--only", "mnist_cnn", "--peers", "--json", str(out)]) == 1
    metadata = json.loads(out.read_text())["metadata"]
    assert metadata["peers"] is True
    assert metadata["peer_error"] == "peer process failed: boom"
    if importlib.util.find_spec("torch") is not None:
        assert "torch" in metadata["peer_versions"]


def test_the_json_and_the_header_say_which_peak_mfu_is_against(monkeypatch, tmp_path, capsys):
    """Was: nowhere; a reader of the JSON could not tell 790 (the peers' figures) from the
    data sheet's 989 TFLOP/s. The JAX stack's versions come with them."""
    from benchmarks import cli

    info = dict(cli._probe(cli._parser().parse_args(["--suite", "cpu", "--only", "mnist_cnn"])))
    w = specs.suite("cpu", ["mnist_cnn"], None)[0]
    result = timing.Timing(first_step_s=1.0, step_s=0.5, window_s=[0.5])
    row = timing.derive(timing.empty_row(w, "jax", "jax"), w, result, 1e12, "NVIDIA H200")
    assert row["peak_tflops"] == 67.0 and row["mfu_pct"] == pytest.approx(100 * 6 / 67)  # float32
    info["device_kind"] = "NVIDIA H200"
    monkeypatch.setattr(cli, "_run_suite", lambda args: (info, [row], None))
    out = tmp_path / "rows.json"
    assert cli.main(["--suite", "cpu", "--only", "mnist_cnn", "--json", str(out)]) == 0
    metadata = json.loads(out.read_text())["metadata"]
    assert metadata["peak_tflops"] == {"bfloat16": 790.0, "float32": 67.0}
    assert "MFU peak TFLOP/s: bfloat16 790, float32 67" in capsys.readouterr().out
    assert metadata["stack_versions"]["jaxlib"] == jax.__version__
    args = ["--suite", "cpu", "--only", "mnist_cnn", "--peak-tflops", "2", "--json", str(out)]
    assert cli.main(args) == 0
    assert json.loads(out.read_text())["metadata"]["peak_tflops"] == {"given": 2.0}


def test_adamw_decays_alike_in_ours_and_the_peers(monkeypatch):
    """Was: ours 0, PyTorch's default 0.01, Keras's 0.004."""
    from benchmarks import measure
    from jaxmodels import optim

    (w,) = specs.suite("cpu", ["bert_base"])
    assert w.optimizer == "adamw" and w.weight_decay == 0.01
    seen = {}

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(optim, "make_optimizer", spy)
    with pytest.raises(RuntimeError, match="stop here"):
        measure.measure(w, "", jax.devices()[:1], 1, 1, 0)
    assert seen["weight_decay"] == 0.01
    if importlib.util.find_spec("torch") is not None:
        import torch

        from benchmarks import peers

        param = torch.nn.Parameter(torch.zeros(2))
        assert peers._optimizer(w, [param]).defaults["weight_decay"] == 0.01


def test_the_peer_process_refuses_zero_steps(tmp_path):
    """Was: zero taken for "the default"."""
    from benchmarks import peers

    with pytest.raises(UsageError, match="need --steps >= 1"):
        peers.main(["--suite", "cpu", "--steps", "0", "--json", str(tmp_path / "p.json")])


def test_mfu_is_over_every_device_the_batch_is_split_over():
    """Was one device's peak whatever the device count: N times too high."""
    w = specs.suite("cpu", ["mnist_cnn"], None)[0]
    result = timing.Timing(first_step_s=1.0, step_s=0.5, window_s=[0.5])
    rows = [
        timing.derive(timing.empty_row(w, "jax", "jax"), w, result, 1e12, "cpu", 2.0, devices=n)
        for n in (1, 4)
    ]
    assert rows[0]["tflops"] == rows[1]["tflops"] == pytest.approx(6.0)  # 3 x 1e12 / 0.5 s
    assert rows[0]["mfu_pct"] == pytest.approx(300.0) and rows[1]["mfu_pct"] == pytest.approx(75.0)


def test_rows_whose_windows_differ_much_say_so():
    """Was: a median of windows that differ several times over (a step still warming up,
    or PyTorch eager on a shared CPU), without a word."""
    w = specs.suite("cpu", ["mnist_cnn"], None)[0]
    steady = timing.Timing(first_step_s=1.0, step_s=0.1, window_s=[0.1, 0.12, 0.14])
    row = timing.derive(timing.empty_row(w, "jax", "jax", note="x"), w, steady, None, "cpu")
    assert row["note"] == "x"
    unsteady = timing.Timing(first_step_s=1.0, step_s=0.1, window_s=[0.1, 0.1, 0.4])
    row = timing.derive(timing.empty_row(w, "jax", "jax", note="x"), w, unsteady, None, "cpu")
    assert row["note"] == "x; unsteady: windows 100-400 ms (more --warmup?)"


def test_float32_on_tf32_tensor_cores_is_labelled_so():
    """XLA's default precision runs float32 matmuls and convolutions on TF32 tensor cores on
    NVIDIA GPUs of compute capability >= 8.0; such rows were labelled float32 and given an
    MFU against the plain FP32 peak."""
    import types

    def gpu(capability):
        return types.SimpleNamespace(platform="gpu", compute_capability=capability)

    arithmetic = timing.xla_float32_arithmetic
    assert arithmetic(gpu("9.0")) == arithmetic(gpu("8.0")) == "TF32"
    assert arithmetic(gpu("7.0")) is None
    assert arithmetic(jax.devices("cpu")[0]) is None
    for full in ("float32", "highest", "F32_F32_F32"):
        with jax.default_matmul_precision(full):
            assert arithmetic(gpu("9.0")) is None, full
    # "high" is the same level as "tensorfloat32" (was: plain float32, MFU against the FP32
    # peak); an algorithm of other arithmetic is named, with no MFU either.
    for tf32 in ("high", "tensorfloat32", "bfloat16", "TF32_TF32_F32"):
        with jax.default_matmul_precision(tf32):
            assert arithmetic(gpu("9.0")) == "TF32", tf32
    with jax.default_matmul_precision("BF16_BF16_F32_X3"):
        assert arithmetic(gpu("9.0")) == "BF16_BF16_F32_X3"
        label, _ = timing.xla_precision("float32", gpu("9.0"))
        assert label == "float32 (BF16_BF16_F32_X3)"
        assert specs.peak_flops("NVIDIA H200", label) is None
    assert timing.xla_precision("float32", gpu("9.0")) == (specs.TF32, timing.XLA_TF32_NOTE)
    assert timing.xla_precision("bfloat16", gpu("9.0")) == ("bfloat16", None)
    assert timing.xla_precision("float32", jax.devices("cpu")[0]) == ("float32", None)
    w = specs.suite("gpu", ["mnist_cnn"], None)[0]
    row = timing.empty_row(w, "jax", "jax", precision=specs.TF32)
    result = timing.Timing(first_step_s=1.0, step_s=0.5, window_s=[0.5])
    timing.derive(row, w, result, 1e12, "NVIDIA H200")
    assert row["tflops"] > 0 and row.get("mfu_pct") is None
    # A given peak is no TF32 or algorithm peak either (was: an MFU against it).
    for label in (specs.TF32, "float32 (BF16_BF16_F32_X3)"):
        assert specs.peak_flops("NVIDIA H200", label, 989.0) is None
    assert timing.derive(row, w, result, 1e12, "NVIDIA H200", 989.0).get("mfu_pct") is None
    assert specs.peak_flops("cpu", "float32", 2.0) == specs.peak_flops("?", "bfloat16", 2.0) == 2e12


def test_first_steps_never_come_from_the_persistent_compilation_cache(tmp_path):
    """With JAX_COMPILATION_CACHE_DIR set, a second run read its program from the cache and
    timed that as the first step and its compilation. Now nothing of ours goes through the
    cache (here: nothing is written to it, though every compilation would be); XLA flags
    with relative paths resolve against the caller's directory."""
    cache = tmp_path / "cache"
    env = dict(_env(), PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=str(cache))
    env.update(JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.update(JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    args = ["--suite", "cpu", "--only", "mnist_cnn", "--steps", "1", "--windows", "1"]
    args += ["--warmup", "0", "--xla-flags=--xla_dump_to=dump", "--json", "rows.json"]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    [row] = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert row["status"] == "ok" and row["compile_s"] > 0
    assert not cache.exists() or not any(cache.iterdir())
    assert any(name.endswith("after_optimizations.txt") for name in os.listdir(tmp_path / "dump"))


def test_unbuilt_family_is_a_skipped_row(monkeypatch):
    from benchmarks import cli, workloads

    monkeypatch.delitem(workloads.BUILDERS, "transformer_lm")
    info = cli._probe(cli._parser().parse_args(["--suite", "cpu", "--only", "transformer_lm"]))
    assert info["jobs"] == []
    [row] = info["skipped"]
    assert row["status"] == "skipped" and row["note"] == workloads.NOT_BUILT


@pytest.mark.reference
def test_peer_process_cpu(tmp_path, monkeypatch):
    pytest.importorskip("torch", reason="the peers need PyTorch (reference extra)")
    # Never imported here: Keras picks a process-wide backend; the peers run it in a child.
    has_keras = importlib.util.find_spec("keras") is not None
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))  # its keras.json, not in ~
    out = tmp_path / "peers.json"
    mnist_forward = 64 * SEED_CNN_FORWARD
    _run(
        "benchmarks.peers",
        "--suite",
        "cpu",
        "--only",
        "mnist_cnn",
        "lstm_article",
        "--steps",
        "1",
        "--windows",
        "2",
        "--warmup",
        "0",
        "--flops",
        f"mnist_cnn={mnist_forward}",
        "--json",
        str(out),
    )
    rows = {(r["workload"], r["impl"]): r for r in json.loads(out.read_text())}
    for key in [("mnist_cnn", "torch eager"), ("lstm_article", "torch eager")]:
        assert rows[key]["status"] == "ok", rows[key]
        assert rows[key]["items_per_s"] > 0
    mnist = rows[("mnist_cnn", "torch eager")]
    assert mnist["model_flops_per_step"] == 3 * mnist_forward
    assert mnist["tflops"] == pytest.approx(3 * mnist_forward / mnist["step_ms"] * 1e-9)
    assert rows[("lstm_article", "torch compile")]["status"] == "skipped"
    # What autocast made of nn.LSTM; float32 only where this CPU cannot train it in bfloat16.
    lstm_note = rows[("lstm_article", "torch eager")]["note"]
    assert "nn.LSTM computes in bfloat16" in lstm_note or (
        "nn.LSTM computes in float32" in lstm_note and "no bfloat16 LSTM" in lstm_note
    ), lstm_note
    # The precision column says so too (was "bfloat16 autocast" for cuDNN's float16 LSTM).
    lstm_precision = rows[("lstm_article", "torch eager")]["precision"]
    bf16 = "computes in bfloat16" in lstm_note
    assert lstm_precision == "bfloat16 autocast" + ("" if bf16 else ", LSTM float32")
    # The Keras peers (Keras 3 on JAX, each in a process of its own): a row per workload.
    for name in ("mnist_cnn", "lstm_article"):
        row = rows[(name, "keras jax")]
        if not has_keras:
            assert row["status"] == "skipped" and row["note"] == "keras is not installed"
            continue
        assert row["status"] == "ok", row
        assert row["framework"] == "keras" and row["precision"] == "float32"
        assert row["device"] == "cpu x1"
        assert math.isfinite(row["items_per_s"]) and row["items_per_s"] > 0
        assert row["first_step_s"] > 0 and len(row["window_ms"]) == 2
        assert "model.fit" in row["note"]
    if has_keras:
        keras_mnist = rows[("mnist_cnn", "keras jax")]
        assert keras_mnist["model_flops_per_step"] == 3 * mnist_forward  # our count
        assert "lax.scan" in rows[("lstm_article", "keras jax")]["note"]  # no cuDNN on CPU
    assert not [key for key in rows if key[0] == "all"]


def test_keras_peer_skipped_without_keras(monkeypatch):
    from benchmarks import peers

    monkeypatch.setattr(peers, "_has_keras", lambda: False)
    logged = []
    rows = peers.run_keras_peers(specs.suite("cpu"), 1, 1, 0, {}, log=logged.append)
    # Only the families with a Keras model get a row; nothing was started.
    assert [r["workload"] for r in rows] == ["mnist_cnn", "lstm_article", "lstm_2x1024"]
    for row in rows:
        assert row["impl"] == "keras jax" and row["framework"] == "keras"
        assert row["status"] == "skipped" and row["note"] == peers.KERAS_MISSING
    assert logged == []
    assert peers.run_keras_peers(specs.suite("cpu", ["resnet50", "bert_base"]), 1, 1, 0, {}) == []


@pytest.mark.reference
def test_peer_process_transformers_cpu(tmp_path):
    pytest.importorskip("torch", reason="the peers need PyTorch (reference extra)")
    pytest.importorskip("transformers", reason="the BERT / GPT-2 peers need transformers")
    out = tmp_path / "peers.json"
    w = _cpu_workloads()
    bert_forward = _transformer_flops_by_hand(w["bert_base"])
    _run(
        "benchmarks.peers",
        "--suite",
        "cpu",
        "--only",
        "bert_base",
        "transformer_lm",
        "--steps",
        "1",
        "--windows",
        "1",
        "--warmup",
        "0",
        "--flops",
        f"bert_base={bert_forward}",
        "--json",
        str(out),
    )
    from benchmarks import peers

    rows = {(r["workload"], r["impl"]): r for r in json.loads(out.read_text())}
    for name in ("bert_base", "transformer_lm"):
        row = rows[(name, "torch eager")]
        assert row["status"] == "ok", row
        assert row["precision"] == "bfloat16 autocast"
        assert row["items_per_s"] > 0
        assert row["tokens_per_s"] == pytest.approx(row["items_per_s"] * w[name].seq_len)
        assert rows[(name, "torch compile")]["status"] == "skipped"
    bert_row = rows[("bert_base", "torch eager")]
    assert bert_row["model_flops_per_step"] == 3 * bert_forward  # our count, not the peer's
    assert "MLM head on all positions" in bert_row["note"]
    # The peer that does our work: the head on the masked positions only.
    masked = rows[("bert_base", "torch eager masked-head")]
    assert masked["status"] == "ok" and masked["note"] == peers.MASKED_HEAD_NOTE, masked
    assert masked["model_flops_per_step"] == 3 * bert_forward
    assert rows[("bert_base", "torch compile masked-head")]["status"] == "skipped"
    assert ("transformer_lm", "torch eager masked-head") not in rows
    # Full-length sequences and no attention mask, as ours (an all-ones mask cost the peer a
    # host read per step, and torch.compile the flash kernel).
    import torch

    _, batch = peers._bert(w["bert_base"], torch.Generator().manual_seed(0))
    assert "attention_mask" not in batch


@pytest.mark.reference
def test_the_masked_head_bert_peer_computes_the_models_own_loss_and_gradients():
    """The masked-head peer gathers the masked positions before the MLM head; on the same
    weights and data its loss and gradients are BertForPreTraining's own (dropout off)."""
    torch = pytest.importorskip("torch", reason="the peers need PyTorch (reference extra)")
    pytest.importorskip("transformers", reason="the BERT peers need transformers")
    from benchmarks import peers

    w = _cpu_workloads()["bert_base"]
    w = dataclasses.replace(w, model={**w.model, "max_predictions": w.model["max_predictions"] + 2})
    built = []
    for masked_head in (False, True):
        torch.manual_seed(0)
        model, batch = peers._bert(w, torch.Generator().manual_seed(1), masked_head)
        model.eval()
        loss = peers._loss(w, model(**batch), batch, None)
        loss.backward()
        built.append((model, batch, loss))
    (stock, stock_batch, stock_loss), (ours, batch, loss) = built
    slots = w.model["max_predictions"]
    assert batch["mlm_positions"].shape == (w.batch, slots)
    real = int((stock_batch["labels"] != -100).sum(1)[0])
    assert real < slots and float(batch["mlm_weights"][:, real:].abs().sum()) == 0.0
    torch.testing.assert_close(loss, stock_loss, rtol=1e-5, atol=1e-5)
    grads = dict(ours.model.named_parameters())
    for name, param in stock.named_parameters():
        torch.testing.assert_close(grads[name].grad, param.grad, rtol=1e-4, atol=1e-6)


def test_next_token_loss_is_the_mean_over_the_first_seq_minus_one_positions():
    import optax

    from benchmarks import workloads

    class Fixed(nn.Module):
        @nn.compact
        def __call__(self, tokens, train=False):
            table = self.param("table", nn.initializers.normal(1.0), (11, 11))
            return table[tokens]

    model = Fixed()
    tokens = jax.random.randint(jax.random.key(0), (3, 8), 0, 11)
    params = model.init(jax.random.key(1), tokens)["params"]
    loss_fn, eval_fn = workloads.next_token_fns(model)
    loss, _ = loss_fn(params, {}, {"tokens": tokens}, jax.random.key(2))
    logits = model.apply({"params": params}, tokens)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:])
    assert float(loss) == pytest.approx(float(expected.mean()), rel=1e-6)
    sums = eval_fn(params, {}, {"tokens": tokens})
    assert float(sums["count"]) == 3 * 7
    assert float(sums["loss"]) == pytest.approx(float(expected.sum()), rel=1e-6)


def test_a_workload_process_that_fails_reports_its_error_not_jaxs_footer():
    """Was: "failed: For simplicity, JAX has removed its internal frames ...", the last line
    of JAX's filtered traceback, in the log and the row; the error itself nowhere."""
    argv = ["--suite", "cpu", "--only", "transformer_lm", "--steps", "1", "--windows", "1"]
    argv += ["--warmup", "1", "--set", "remat_policy=bogus"]
    proc = _run("benchmarks", *argv, status=1, timeout=300)
    assert "failed: ConfigError: unknown remat_policy 'bogus'" in proc.stdout, proc.stdout
    assert "For simplicity" not in proc.stdout


def test_set_takes_true_and_false_in_any_case_and_refuses_another_type():
    """Was: "false" kept as the string "false", which a model reads as true."""
    from benchmarks import cli, workloads

    assert cli.model_overrides(["scan_layers=false", "remat=TRUE"]) == {
        "scan_layers": False,
        "remat": True,
    }
    (bert_base,) = specs.suite("cpu", ["bert_base"])
    assert workloads.setting_error(bert_base, "scan_layers", False) is None
    assert "is an int (here " in workloads.setting_error(bert_base, "hidden_size", "abc")
    assert "is an int" in workloads.setting_error(bert_base, "hidden_size", True)
    assert workloads.setting_error(bert_base, "hidden_dropout", 0) is None  # a float's int
    assert "is a float (here" in workloads.setting_error(bert_base, "hidden_dropout", False)


def test_set_of_a_setting_whose_default_is_none_takes_its_annotations_types():
    """Was: any value, since the check compared with the default's type (None's)."""
    from benchmarks import workloads

    (bert_base,) = specs.suite("cpu", ["bert_base"])
    assert workloads.setting_error(bert_base, "remat_policy", "dots") is None
    assert workloads.setting_error(bert_base, "remat_policy", None) is None
    message = workloads.setting_error(bert_base, "remat_policy", 3)
    assert message == "remat_policy=3: bert_base's remat_policy is a str or None (here None)"
    assert workloads.setting_error(bert_base, "classifier_dropout", 0) is None  # float | None
    assert "float or None" in workloads.setting_error(bert_base, "classifier_dropout", "x")
    (lstm,) = specs.suite("cpu", ["lstm_article"])
    assert workloads.setting_error(lstm, "unroll", 8) is None
    assert "is an int or None" in workloads.setting_error(lstm, "unroll", 2.5)
    assert "is an int or None" in workloads.setting_error(lstm, "unroll", True)
