"""The application end to end: the default job learns, resume is exact, preemption saves,
several processes equal one, and bad input fails with a clear message."""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest

from jaxmodels import checkpoint
from jaxmodels.errors import CheckpointError, ConfigError, DataError, NonFiniteError, UserError
from tests.helpers import ROOT, app_env, run_app, saved_params, train_cmd
from train import logs
from train.trainer import train_and_evaluate, validate_config

DIGITS_SMOKE = "configs/cnn_digits.py:smoke"
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))


def load_config(name: str, variant: str | None = None):
    path = os.path.join(ROOT, "configs", name)
    spec = importlib.util.spec_from_file_location(f"cfg_{name[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(variant)
    config.progress_bar = False
    return config


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
@pytest.mark.parametrize("variant", [None, "smoke"])
def test_every_config_parses_and_validates(path, variant):
    config = load_config(os.path.basename(path), variant)
    validate_config(config)
    assert config.total_steps > 0


def test_the_imagenet_recipe_follows_an_overridden_batch_size(tmp_path):
    """Was: --config.batch_size=256 kept the rate of batch 1024 (0.4) and its step counts
    (22.5 epochs); the rate is 0.1 x batch/256 and the run 90 epochs at any batch size."""
    config = load_config("resnet50_imagenet.py")
    config.batch_size = 256
    assert config.optimizer.learning_rate == pytest.approx(0.1)
    assert config.total_steps == 90 * (1_281_167 // 256)
    assert config.optimizer.warmup_steps == config.eval_every * 5 == 5 * (1_281_167 // 256)
    # A derived value can still be set on its own (was: eval_every=500 set them all, and the
    # run became 45,000 steps).
    config.eval_every = 500
    assert (config.total_steps, config.optimizer.warmup_steps, config.checkpoint_every) == (
        90 * 5004,
        5 * 5004,
        5004,
    )
    config.total_steps = 100
    assert config.total_steps == 100 and config.checkpoint_every == 5004
    # From the command line (the smoke variant: synthetic images, 2 steps).
    run = run_app("configs/resnet50_imagenet.py:smoke", str(tmp_path), "--config.batch_size=16")
    assert run.returncode == 0, run.stderr[-3000:]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["optimizer"]["learning_rate"] == pytest.approx(0.1 * 16 / 256)


@pytest.mark.parametrize("name", ["cnn_mnist.py", "resnet18_cifar10.py", "resnet50_imagenet.py"])
def test_smoke_variants_train(name, tmp_path):
    config = load_config(name, "smoke")
    train_and_evaluate(config, str(tmp_path))
    rows = [r for r in logs.read_metrics(str(tmp_path)) if "train/loss" in r]
    assert rows[-1]["step"] == config.total_steps
    assert np.isfinite(rows[-1]["train/loss"])
    assert os.path.isdir(tmp_path / "checkpoints" / str(config.total_steps))


def test_default_job_reaches_97_percent(tmp_path):
    """README command 1: the CNN on the embedded digits, full config."""
    config = load_config("cnn_digits.py")
    start = time.perf_counter()
    result = train_and_evaluate(config, str(tmp_path))
    elapsed = time.perf_counter() - start
    assert result["eval/accuracy"] >= 0.97, result
    rows = logs.read_metrics(str(tmp_path))
    assert {"train/loss", "train/accuracy", "train/learning_rate"} <= set(rows[0])
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [450, 900, 1350]
    assert os.path.exists(tmp_path / "config.json")
    print(f"default job: {result} in {elapsed:.1f}s")


def _wait_for_step(workdir: str, step: int, proc: subprocess.Popen, timeout: float = 240):
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"run ended early: {proc.communicate()}")
        if os.path.exists(path):
            rows = logs.read_metrics(workdir)
            if rows and rows[-1]["step"] >= step:
                return
        time.sleep(0.05)
    raise AssertionError("run made no progress")


def _stopped_at(workdir: str, overrides: list[str], step: int, signum: int) -> tuple[str, str, int]:
    """Runs cnn_digits in `workdir` and sends `signum` once it logged `step`; the run must
    save and exit with status 0 (SIGTERM) or end by the signal (SIGINT, as a shell expects
    of a Ctrl-C). Its stdout, stderr and the step it saved."""
    proc = subprocess.Popen(
        train_cmd("configs/cnn_digits.py", workdir, *overrides),
        cwd=ROOT,
        env=app_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_step(workdir, step, proc)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == (-signum if signum == signal.SIGINT else 0), err[-3000:]
    saving = f"{signal.Signals(signum).name}: saved step "
    assert saving in out, out[-3000:]
    return out, err, int(out.split(saving)[1].split(";")[0])


def test_sigterm_then_resume_equals_uninterrupted_run(tmp_path):
    total = 400
    overrides = [
        f"--config.total_steps={total}",
        "--config.log_every=5",
        "--config.eval_every=0",
        "--config.checkpoint_every=100",
    ]
    straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
    done = run_app("configs/cnn_digits.py", straight, *overrides)
    assert done.returncode == 0, done.stderr[-3000:]

    out, _, saved = _stopped_at(broken, overrides, 20, signal.SIGTERM)
    assert 20 <= saved < total
    assert os.path.isdir(os.path.join(broken, "checkpoints", str(saved)))
    # was "final: ..." (the last metrics of a run that had not finished)
    assert f"last metrics (stopped at step {saved} of {total}; the same" in out
    assert "final:" not in out and "final:" in done.stdout

    resumed = run_app("configs/cnn_digits.py", broken, *overrides)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {saved}" in resumed.stdout

    a, b = saved_params(straight, total), saved_params(broken, total)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    # Same batches: every loss logged after the resume point is bitwise the same.
    ref = {r["step"]: r["train/loss"] for r in logs.read_metrics(straight) if "train/loss" in r}
    after = [r for r in logs.read_metrics(broken) if r["step"] >= saved + 5 and "train/loss" in r]
    assert after
    for r in after:
        assert r["train/loss"] == ref[r["step"]], r["step"]


def test_ctrl_c_saves_a_checkpoint_and_ends_by_the_signal(tmp_path):
    """Was: a KeyboardInterrupt traceback, nothing saved since the last checkpoint (or, in
    some runs, the interrupt lost inside JAX and the run going on)."""
    workdir = str(tmp_path / "run")
    overrides = ["--config.total_steps=2000", "--config.log_every=5", "--config.eval_every=0"]
    out, err, saved = _stopped_at(workdir, overrides, 10, signal.SIGINT)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert 10 <= saved < 2000
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(saved)))
    assert f"last metrics (stopped at step {saved} of 2000; the same" in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_two(config: str, workdir: str, *overrides: str) -> list[subprocess.Popen]:
    """Starts `config` as 2 processes x 4 devices (jax.distributed on this machine)."""
    port = _free_port()
    return [
        subprocess.Popen(
            train_cmd(
                config,
                workdir,
                *overrides,
                f"--coordinator_address=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            cwd=ROOT,
            env=app_env(devices=4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]


def _two_processes(config: str, workdir: str, *overrides: str, status: int = 0) -> list[str]:
    """Runs `config` as 2 processes x 4 devices, which must exit with `status`; their
    stdouts and stderrs."""
    procs = _start_two(config, workdir, *overrides)
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == status, err[-3000:]
    return [out + err for out, err in outs]


def test_two_processes_with_sharded_parameters_save_while_training(tmp_path):
    """FSDP over 2 processes with asynchronous saves during the run: the state's finiteness
    check before each save was one collective program per leaf, and in about half the runs
    the processes ended up waiting for each other (one in the check, one in Orbax's
    barrier), for ever."""
    workdir = str(tmp_path / "fsdp")
    overrides = ["--config.total_steps=12", "--config.eval_every=6", "--config.log_every=3"]
    overrides += ["--config.checkpoint_every=4", "--config.mesh.data=2", "--config.mesh.fsdp=4"]
    _two_processes(
        "configs/cnn_digits.py:smoke", workdir, *overrides, "--config.sharding_rules=fsdp"
    )
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "4", "8"]
    # Extended: process 0 finds step 12's evaluation in its log, and both take it.
    overrides[0] = "--config.total_steps=16"
    lead, _ = _two_processes(
        "configs/cnn_digits.py:smoke", workdir, *overrides, "--config.sharding_rules=fsdp"
    )
    assert "step 12: " in lead and "(logged before the restart" in lead
    evals = [r["step"] for r in logs.read_metrics(workdir) if "eval/loss" in r]
    assert evals == [6, 12, 16]


def test_tensor_parallelism_across_processes_equals_one_process(tmp_path):
    """mesh.tensor=8 over 2 processes x 4 devices: both processes hold every batch row, so
    both must load the whole batch. Each loaded a different half (which JAX took for the
    same rows): eval accuracy 0.12 where one process reaches 0.64."""
    overrides = ["--config.total_steps=12", "--config.eval_every=6", "--config.log_every=3"]
    overrides += ["--config.mesh.data=1", "--config.mesh.tensor=8"]
    overrides += ["--config.sharding_rules=fsdp_tp"]
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    one = run_app("configs/cnn_digits.py:smoke", single, *overrides)
    assert one.returncode == 0, one.stderr[-3000:]
    _two_processes("configs/cnn_digits.py:smoke", multi, *overrides)
    evals = [
        [r["eval/accuracy"] for r in logs.read_metrics(d) if "eval/accuracy" in r]
        for d in (single, multi)
    ]
    np.testing.assert_allclose(evals[0], evals[1], atol=1e-6)


def test_two_processes_equal_one(tmp_path):
    """jax.distributed on one machine: 2 processes x 4 devices == 1 process x 8 devices."""
    overrides = ["--config.total_steps=12", "--config.eval_every=6", "--config.log_every=3"]
    single = str(tmp_path / "single")
    one = run_app("configs/cnn_digits.py", single, *overrides)
    assert one.returncode == 0, one.stderr[-3000:]

    multi = str(tmp_path / "multi")
    outs = _two_processes("configs/cnn_digits.py", multi, *overrides)
    assert "2 process(es)" in outs[0]
    a, b = saved_params(single, 12), saved_params(multi, 12)
    # The two layouts sum the gradients in different orders, and Adam's normalised updates
    # magnify the rounding where a gradient is near zero: equal to 1e-5 (parameters ~0.02).
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-5, err_msg=k)
    ea = [r for r in logs.read_metrics(single) if "eval/accuracy" in r]
    eb = [r for r in logs.read_metrics(multi) if "eval/accuracy" in r]
    assert [r["eval/accuracy"] for r in ea] == [r["eval/accuracy"] for r in eb]


# ----------------------------------------------------------------------------- bad input


def _assert_clean_failure(proc, *phrases):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for phrase in phrases:
        assert phrase in proc.stderr, (phrase, proc.stderr[-3000:])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # were JAX's ValueError tracebacks ("coordinator_address should be defined.")
        (["--num_processes=2", "--process_id=0"], "coordinator_address should be defined"),
        (["--num_processes=2", "--process_id=2"], "--process_id=2 is not between 0 and"),
        # was a single-process run
        (["--num_processes=0"], "--num_processes=0 must be >= 1"),
    ],
)
def test_multi_process_flags_that_cannot_start_are_named(tmp_path, flags, message):
    proc = run_app(DIGITS_SMOKE, str(tmp_path / "run"), *flags, devices=1)
    _assert_clean_failure(proc, message)
    assert proc.returncode == 2
    assert not (tmp_path / "run").exists()


def test_resumed_run_compiles_from_the_workdirs_cache(tmp_path):
    # Every compilation is cached here, however short; no cache directory from the caller's
    # environment.
    env = {"JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_COMPILATION_CACHE_DIR": ""}
    workdir = str(tmp_path / "run")
    cache = os.path.join(workdir, "compilation_cache")
    first = run_app(DIGITS_SMOKE, workdir, "--config.total_steps=2", devices=1, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"compilation cache {cache}" in first.stdout
    entries = sorted(os.listdir(cache))
    assert any(name.startswith("jit_train_step") for name in entries), entries
    resumed = run_app(DIGITS_SMOKE, workdir, "--config.total_steps=4", devices=1, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming at step 2" in resumed.stdout
    assert sorted(os.listdir(cache)) == entries  # nothing compiled anew: all read back

    # Off, even with a cache directory in the environment.
    env["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path / "from_env")
    off = run_app(
        DIGITS_SMOKE, str(tmp_path / "off"), "--config.compilation_cache_dir=", devices=1, env=env
    )
    assert off.returncode == 0, off.stderr[-3000:]
    assert "compilation cache off" in off.stdout
    assert not os.path.exists(tmp_path / "off" / "compilation_cache")
    assert not os.path.exists(tmp_path / "from_env") or not os.listdir(tmp_path / "from_env")


def test_compilation_cache_setting_is_restored_after_a_run(tmp_path, monkeypatch):
    import jax

    from train import trainer

    before = jax.config.jax_compilation_cache_dir
    with trainer.compilation_cache("auto", str(tmp_path)) as path:
        assert path == jax.config.jax_compilation_cache_dir
        assert path == os.path.join(str(tmp_path), "compilation_cache")
    assert jax.config.jax_compilation_cache_dir == before
    with trainer.compilation_cache("", str(tmp_path)) as path:
        assert path is None and jax.config.jax_compilation_cache_dir is None
    assert jax.config.jax_compilation_cache_dir == before
    # Was a warning of JAX's, and the run said it cached there.
    (tmp_path / "a_file").write_text("x")
    cache = trainer.compilation_cache(str(tmp_path / "a_file"), str(tmp_path))
    with pytest.raises(ConfigError, match=r"config key compilation_cache_dir: .*a_file is a"):
        cache.__enter__()
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "a_file"))
    cache = trainer.compilation_cache("auto", str(tmp_path))  # named where it came from
    with pytest.raises(ConfigError, match=r"^\$JAX_COMPILATION_CACHE_DIR: .*a_file is a"):
        cache.__enter__()
    assert jax.config.jax_compilation_cache_dir == before


def test_profile_steps_trace_the_chosen_steps(tmp_path):
    from jax.profiler import ProfileData

    workdir = str(tmp_path / "run")
    done = run_app(
        DIGITS_SMOKE,
        workdir,
        "--config.total_steps=5",
        "--config.profile_steps=2",
        "--config.profile_skip_steps=1",
        devices=1,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    profile = os.path.join(workdir, "profile")
    assert f"profile of steps 2-3 written to {profile}" in done.stdout
    (trace,) = glob.glob(os.path.join(profile, "**", "*.xplane.pb"), recursive=True)
    events = [
        e
        for plane in ProfileData.from_file(trace).planes
        for line in plane.lines
        for e in line.events
    ]
    names = {e.name for e in events}
    assert "PjitFunction(train_step)" in names
    steps = sorted({dict(e.stats).get("step_num") for e in events if e.name == "train"})
    assert steps == [2, 3], steps  # numbered from 1, as in the message and the logs
    # A window past the run's end is said so (was: no trace, and no word).
    done = run_app(
        DIGITS_SMOKE,
        str(tmp_path / "late"),
        "--config.total_steps=5",
        "--config.profile_steps=2",
        "--config.profile_skip_steps=10",
        devices=1,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "profile's steps 11-12 (profile_skip_steps=10 after step 0) reach past" in done.stdout
    assert "no trace is taken; lower profile_skip_steps" in done.stdout


def test_unknown_override_key_fails_cleanly(tmp_path):
    proc = run_app("configs/cnn_digits.py", str(tmp_path), "--config.no_such_key=1")
    _assert_clean_failure(proc, "no_such_key")
    assert not os.path.exists(tmp_path / "checkpoints")


def test_bad_config_files_variants_and_workdirs_fail_cleanly(tmp_path):
    """Were: the default recipe for a misspelt variant, a traceback for a missing file, a
    run in the current directory for an empty --workdir."""
    proc = run_app("configs/cnn_digits.py:smok", str(tmp_path / "a"))
    _assert_clean_failure(proc, "unknown config variant 'smok'", "'smoke'")
    proc = run_app("configs/no_such_config.py", str(tmp_path / "b"))
    _assert_clean_failure(proc, "cannot load the --config file", "no_such_config.py")
    proc = run_app(DIGITS_SMOKE, "")
    _assert_clean_failure(proc, "--workdir is empty")
    proc = run_app(DIGITS_SMOKE, str(tmp_path / "c"), "--config.optimzer.name=sgd")
    _assert_clean_failure(proc, "unknown config key 'optimzer'", 'Did you mean "optimizer"')
    # A misspelt last key came wrapped in an AttributeError: its message was escaped reprs.
    proc = run_app(DIGITS_SMOKE, str(tmp_path / "d"), "--config.total_stepz=5")
    _assert_clean_failure(
        proc, "unknown config key 'total_stepz'\nDid you mean \"total_steps\" instead"
    )
    proc = run_app(DIGITS_SMOKE, str(tmp_path / "e"), "--config.model.foo=5")
    _assert_clean_failure(proc, "bad --config override: unknown config key 'model.foo'\n")
    assert not os.listdir(tmp_path)
    # Were: absl's traceback, status 1.
    broken = tmp_path.parent / f"{tmp_path.name}_broken.py"
    broken.write_text("def get_config(:\n    pass\n")
    proc = run_app(str(broken), str(tmp_path / "f"))
    _assert_clean_failure(proc, f"cannot load the --config file: {broken}:1: SyntaxError")
    broken.write_text("import no_such_module\n")
    proc = run_app(str(broken), str(tmp_path / "g"))
    _assert_clean_failure(proc, "cannot load the --config file: ModuleNotFoundError")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("optimizer.accumulate_steps", 0, "optimizer.accumulate_steps must be >= 1"),
        # Were "unknown optimizer 'adamm'", with no word of the config key.
        ("optimizer.name", "adamm", "optimizer.name: 'adamm' is not one of adam, adamw,"),
        ("optimizer.schedule", "cosin", "optimizer.schedule: .* \\(did you mean 'cosine'\\?\\)"),
        ("dtype", "int32", "not a floating-point dtype"),
        ("dtype", "float64", r"'float64' computes in float32 unless .* \(JAX_ENABLE_X64=1\)"),
        ("seed", -1, "seed must be >= 0"),
        # Were Grain's and NumPy's tracebacks.
        ("data_threads", -1, "data_threads must be >= 0, got -1"),
        # Was found at the first train step, after the run's record had been rewritten.
        ("model.dropout_rate", 1.5, r"model.dropout_rate must be in \[0, 1\), got 1.5"),
        ("eval_examples", -5, "eval_examples must be >= 0, got -5"),
        ("optimizer.grad_clip_norm", -1.0, r"optimizer.grad_clip_norm must be >= 0, got -1.0 \(0"),
        ("optimizer.weight_decay", -0.1, "optimizer.weight_decay must be >= 0"),
        ("max_length", 0, "max_length must be > 0"),
        ("vocab_size", 1, "vocab_size must be >= 2"),
        # Were: BERT trained without its MLM objective (0), a deep numpy error (-1), a PIL
        # traceback (image_size 0), a NaN loss 10 steps in (std 0), a silent run (1.5).
        ("max_predictions", 0, "max_predictions must be > 0"),
        ("image_size", 0, "image_size must be > 0"),
        ("image_std", (0.0,), r"image_std: \(0.0,\) divides the images; every value must be > 0"),
        ("label_smoothing", 1.5, r"label_smoothing must be in \[0, 1\) \(0: none\), got 1.5"),
        # Was "learning_rate must be > 0", naming no config key.
        ("optimizer.learning_rate", -0.1, "config key optimizer.learning_rate must be > 0"),
        # Was named "warmup_steps=..." with both numbers divided by accumulate_steps.
        ("optimizer.warmup_steps", 10**6, r"optimizer.warmup_steps=1000000 must be between 0"),
        ("optimizer.warmup_steps", -1, r"optimizer.warmup_steps=-1 must be between 0 and"),
        # Were accumulated and never applied.
        (
            "optimizer.accumulate_steps",
            4,
            r"total_steps=1350 is not a multiple of optimizer.accumulate_steps=4: the last 2 "
            r"batches would be accumulated and never applied; use total_steps=1348",
        ),
    ],
)
def test_values_that_cannot_run_are_named(key, value, message):
    config = load_config("cnn_digits.py")
    node, name = (config[key.split(".")[0]], key.split(".")[1]) if "." in key else (config, key)
    setattr(node, name, value)
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_values_the_dataset_contradicts_are_named(tmp_path):
    """Were: a loss below zero from labels past the logits, a model of 2-channel inputs for
    1-channel digits."""
    config = load_config("cnn_digits.py", "smoke")
    config.num_classes = 5
    with pytest.raises(ConfigError, match="num_classes=5 is fewer than the 10 classes"):
        train_and_evaluate(config, str(tmp_path))
    config = load_config("cnn_digits.py", "smoke")
    config.image_mean, config.image_std = (0.1, 0.2), (0.3, 0.3)
    with pytest.raises(ConfigError, match="image_mean/image_std have 2 values for images of 1"):
        train_and_evaluate(config, str(tmp_path))


def test_a_checkpoint_past_total_steps_is_refused(tmp_path):
    config = load_config("cnn_digits.py", "smoke")
    config.total_steps = config.checkpoint_every = 4
    train_and_evaluate(config, str(tmp_path))
    saved = (tmp_path / "config.json").read_text()
    config.total_steps = 2
    with pytest.raises(ConfigError, match="latest checkpoint .* is step 4, past total_steps=2"):
        train_and_evaluate(config, str(tmp_path))
    assert (tmp_path / "config.json").read_text() == saved  # the run's record is kept


def test_a_resume_without_the_runs_record_says_so_and_keeps_an_unreadable_one(tmp_path, capsys):
    """Was silent: another seed and batch size resumed unchecked, and an unreadable
    config.json was overwritten."""
    config = load_config("cnn_digits.py", "smoke")
    config.total_steps = config.checkpoint_every = 4
    train_and_evaluate(config, str(tmp_path))
    (tmp_path / "config.json").write_text('{"task": "image_cl')
    config.total_steps = 6
    capsys.readouterr()
    train_and_evaluate(config, str(tmp_path))
    err = capsys.readouterr().err
    assert "warning: resuming without the run's record: " in err
    assert "config.json cannot be read" in err and "kept as config.json.unreadable" in err
    assert (tmp_path / "config.json.unreadable").read_text() == '{"task": "image_cl'
    os.remove(tmp_path / "config.json")
    config.total_steps = 8
    train_and_evaluate(config, str(tmp_path))
    assert "config.json is missing. Whether this config" in capsys.readouterr().err
    # A second unreadable record does not replace the first one kept.
    (tmp_path / "config.json").write_text("{")
    config.total_steps = 10
    train_and_evaluate(config, str(tmp_path))
    assert "kept as config.json.unreadable-2" in capsys.readouterr().err
    assert (tmp_path / "config.json.unreadable-2").read_text() == "{"


def test_a_start_at_step_0_keeps_the_logs_of_an_earlier_start_aside(tmp_path):
    """Were overwritten: a run whose checkpoints were deleted (to free space) lost its
    metrics and config when the workdir was used again."""
    config = load_config("cnn_digits.py", "smoke")
    config.total_steps = config.checkpoint_every = 4
    train_and_evaluate(config, str(tmp_path))
    rows = (tmp_path / "metrics.jsonl").read_text()
    for seed in (3, 4):  # twice, within a second or not
        shutil.rmtree(tmp_path / "checkpoints")
        config.seed = seed
        train_and_evaluate(config, str(tmp_path))
    first, second = sorted(os.listdir(tmp_path / "previous"))
    assert (tmp_path / "previous" / first / "metrics.jsonl").read_text() == rows
    # TensorBoard's event files too (it showed the starts' curves as one run's)
    assert os.listdir(tmp_path / "previous" / first / "tensorboard")
    for folder, seed in ((first, 0), (second, 3)):
        recorded = json.loads((tmp_path / "previous" / folder / "config.json").read_text())
        assert recorded["seed"] == seed
    assert json.loads((tmp_path / "config.json").read_text())["seed"] == 4
    assert [r["step"] for r in logs.read_metrics(str(tmp_path)) if "eval/loss" in r] == [4]


def test_warmup_counts_training_steps_with_accumulation():
    """total_steps and warmup_steps both count batches; with 4 batches per update the
    warmup of 8 batches ends after 2 updates (was: after 8 updates, 32 batches)."""
    import jax.numpy as jnp

    from jaxmodels import optim
    from train.trainer import _make_optimizer

    config = load_config("cnn_digits.py")
    config.total_steps, config.optimizer.learning_rate = 40, 1.0
    config.optimizer.warmup_steps, config.optimizer.accumulate_steps = 8, 4
    config.optimizer.schedule = "linear"
    tx = _make_optimizer(config)
    params = {"w": jnp.zeros(3)}
    state = tx.init(params)
    rates = []
    for _ in range(3 * 4):
        _, state = tx.update({"w": jnp.ones(3)}, state, params)
        rates.append(float(optim.current_learning_rate(state)))
    assert rates[3] == pytest.approx(0.5)  # after the first update, half the warmup
    assert rates[7] == pytest.approx(1.0)  # warmup over after two updates
    assert rates[11] == pytest.approx(1.0 - 1 / 8)  # 10 updates in all, 8 of decay


def test_unknown_key_in_config_file_is_named():
    config = load_config("cnn_digits.py")
    with config.unlocked():
        config.optimzer = {"name": "sgd"}
    with pytest.raises(ConfigError, match="unknown config key 'optimzer'.*'optimizer"):
        validate_config(config)


def test_momentum_keys_an_optimizer_ignores_are_named_in_a_warning(capsys):
    """Were ignored without a word (Adam has no momentum); the optimizer built from such a
    config does not warn a second time."""
    from train import trainer

    config = load_config("cnn_digits.py")
    config.optimizer.name = "adamw"
    config.optimizer.momentum = 0.9
    validate_config(config)
    err = capsys.readouterr().err
    assert (
        "warning: config key optimizer.momentum=0.9 has no effect on adamw, which has no "
        "momentum (its first moment decays by optimizer.b1, here 0.9)"
    ) in err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trainer._make_optimizer(config)
        config.optimizer.name = "sgd"
        config.optimizer.nesterov = True
        validate_config(config)
        trainer._make_optimizer(config)
    assert capsys.readouterr().err == ""
    config.optimizer.name = "lamb"
    validate_config(config)
    assert (
        "warning: config keys optimizer.momentum=0.9 and optimizer.nesterov=True have no "
        "effect on lamb"
    ) in capsys.readouterr().err


def test_unknown_step_rng_is_named():
    config = load_config("cnn_digits.py")
    config.step_rng = "mersenne"
    with pytest.raises(ConfigError, match="step_rng.*'mersenne'.*rbg"):
        validate_config(config)


def test_unknown_model_field_is_named(tmp_path):
    config = load_config("cnn_digits.py")
    config.model.widht = 3
    with pytest.raises(ConfigError, match="widht"):
        train_and_evaluate(config, str(tmp_path))


def test_batch_not_divisible_fails_cleanly(tmp_path):
    proc = run_app("configs/cnn_digits.py", str(tmp_path), "--config.batch_size=30")
    _assert_clean_failure(proc, "batch_size=30 is not divisible by the data-parallel size 8")


def test_missing_dataset_says_how_to_get_it(tmp_path):
    config = load_config("cnn_mnist.py")
    config.data_dir = str(tmp_path / "empty")
    with pytest.raises(DataError, match=r"(?s)not prepared.*never downloads.*tfds build mnist"):
        train_and_evaluate(config, str(tmp_path / "run"))
    # The workdir this start made held only its lock (was left behind); one that was there
    # stays.
    assert not (tmp_path / "run").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError):
        train_and_evaluate(config, str(tmp_path / "mine"))
    assert os.listdir(tmp_path / "mine") == [".lock"]


def test_a_split_the_dataset_lacks_is_named_with_those_it_has(tmp_path):
    """Was TFDS's "Unknown split ... Should be one of [...].." followed by advice to prepare
    the dataset as array_record, which was not the problem."""
    config = load_config("cnn_digits.py", "smoke")
    config.eval_split = "validation"
    with pytest.raises(DataError, match=r"has no split 'validation' .*\['train', 'test'\]: set"):
        train_and_evaluate(config, str(tmp_path / "run"))
    config.eval_split, config.train_split = "test", "train[:50%]+validation"
    with pytest.raises(DataError, match=r"no split 'validation' \(asked for 'train\[:50%\]\+"):
        train_and_evaluate(config, str(tmp_path / "run"))
    config.train_split = "train[:50%]"  # TFDS's slices still work, and "all"
    config.eval_split = "all"
    assert train_and_evaluate(config, str(tmp_path / "run"))


def test_missing_dataset_fails_cleanly_from_the_command_line(tmp_path):
    proc = run_app(
        "configs/cnn_mnist.py", str(tmp_path / "run"), f"--config.data_dir={tmp_path}/empty"
    )
    _assert_clean_failure(proc, "tfds build mnist")


def test_unwritable_workdir_fails_cleanly(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    proc = run_app("configs/cnn_digits.py", str(blocker / "run"))
    _assert_clean_failure(proc, "not writable", "--workdir")
    # was "is not writable (File exists)"
    with pytest.raises(UserError, match=r"--workdir .*a_file is a file; pass a folder"):
        train_and_evaluate(load_config("cnn_digits.py", "smoke"), str(blocker))


def test_checkpoint_from_a_different_model_is_refused_and_kept(tmp_path):
    """The same model class, sized otherwise (another class is a `ConfigError` before
    anything is read: `test_resuming_with_a_changed_config`)."""
    config = load_config("cnn_digits.py", "smoke")
    config.model = {"name": "ResNet18", "small_images": True, "num_filters": 4}
    config.total_steps = config.checkpoint_every = 2
    train_and_evaluate(config, str(tmp_path))
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    other = load_config("cnn_digits.py", "smoke")
    other.model = {"name": "ResNet18", "small_images": True, "num_filters": 8}
    other.total_steps = 4
    with pytest.raises(
        CheckpointError, match=r"(?s)different model.*shape mismatch.*params/.*num_filters 4 -> 8"
    ):
        train_and_evaluate(other, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before


def test_non_finite_loss_stops_naming_the_step_and_keeps_checkpoint(tmp_path):
    config = load_config("cnn_digits.py", "smoke")
    config.optimizer.name = "sgd"
    config.total_steps = 10
    train_and_evaluate(config, str(tmp_path))  # a good run to step 10 ...
    config.total_steps = 40
    config.checkpoint_every = 5
    config.log_every = 5
    config.optimizer.learning_rate = 1e30  # ... resumed with a learning rate that diverges
    with pytest.raises(NonFiniteError, match=r"non-finite loss .* at step (\d+)") as info:
        train_and_evaluate(config, str(tmp_path))
    message = str(info.value)
    bad_step = int(message.split(" at step ")[1].split(";")[0].split(".")[0])
    assert 10 < bad_step <= 15
    assert "first non-finite parameter" in message
    kept = sorted(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())
    assert kept and max(kept) < bad_step
    assert f"last good checkpoint is step {max(kept)}" in message
    params = saved_params(str(tmp_path), max(kept))
    assert all(np.all(np.isfinite(v)) for v in params.values())


def test_a_failed_save_does_not_hide_the_non_finite_loss(tmp_path, monkeypatch):
    """A background save that failed was raised in place of the NaN's diagnosis, from the
    wait for saves in flight that names the last good checkpoint."""
    config = load_config("cnn_digits.py", "smoke")
    config.optimizer.name = "sgd"
    config.total_steps = 10
    train_and_evaluate(config, str(tmp_path))
    real_wait = checkpoint.Checkpointer.wait
    failed = []

    def failing_wait(self):
        real_wait(self)
        if self.all_steps(wait=False) != [10]:  # a save of this run
            failed.append(True)
            raise OSError("a background save failed")

    monkeypatch.setattr(checkpoint.Checkpointer, "wait", failing_wait)
    config.total_steps = 40
    config.checkpoint_every = config.log_every = 1
    config.optimizer.learning_rate = 1e30
    with pytest.raises(OSError, match="a background save failed") as info:
        train_and_evaluate(config, str(tmp_path))
    assert failed
    assert isinstance(info.value.__context__, NonFiniteError)
    assert "first non-finite parameter" in str(info.value.__context__)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_a_non_finite_state_is_never_saved(tmp_path):
    """The loss of a step comes from the parameters before its update: an update to inf on a
    checkpoint step used to be saved, and then named the last good checkpoint."""
    config = load_config("cnn_digits.py", "smoke")
    config.total_steps = 3
    config.checkpoint_every = config.log_every = 1
    config.optimizer.learning_rate = 1e39  # the first update overflows float32
    with pytest.raises(NonFiniteError, match=r"state after step 1 is not finite .*not saved"):
        train_and_evaluate(config, str(tmp_path))
    assert not [s for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_setting_up_exits_at_once_without_saving(tmp_path, monkeypatch, signum):
    """Was: killed by the signal (status 143) until the loop had started. Ctrl-C raises
    `Interrupted` (a KeyboardInterrupt, so that a caller's loop stops too), with the same
    clean-up."""
    from train import tasks
    from train.trainer import Interrupted

    build = tasks.build
    reached = []
    before = signal.getsignal(signum)

    def preempted_build(*args):
        os.kill(os.getpid(), signum)  # delivered while the task is being built
        reached.append("after the signal")
        return build(*args)

    monkeypatch.setattr(tasks, "build", preempted_build)
    config = load_config("cnn_digits.py", "smoke")
    if signum == signal.SIGINT:
        with pytest.raises(Interrupted) as info:
            train_and_evaluate(config, str(tmp_path / "new"))
        assert info.value.metrics == {}
    else:
        assert train_and_evaluate(config, str(tmp_path / "new")) == {}
    assert reached == []  # the setup stopped there
    assert not os.path.exists(tmp_path / "new")  # made by this start, and nothing in it
    assert signal.getsignal(signum) is before  # the handler is gone again


def test_ctrl_c_on_one_of_two_processes_ends_both_by_the_signal(tmp_path):
    """Was: the process that got it died by SIGINT before the distributed service shut down,
    and the other, which returned, was aborted by that service (status 134)."""
    workdir = str(tmp_path / "run")
    overrides = ["--config.total_steps=2000", "--config.log_every=5", "--config.eval_every=0"]
    procs = _start_two("configs/cnn_digits.py", workdir, *overrides)
    try:
        _wait_for_step(workdir, 10, procs[0])
        procs[1].send_signal(signal.SIGINT)
        outs = [p.communicate(timeout=180) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [-signal.SIGINT] * 2, outs[0][1][-2000:]
    saved = int(outs[0][0].split("on another process: saved step ")[1].split(";")[0])
    assert os.path.isdir(os.path.join(workdir, "checkpoints", str(saved)))


def test_ctrl_c_in_the_last_evaluation_still_raises(tmp_path, monkeypatch):
    """Was lost: the run, saved and evaluated, returned as a finished one would."""
    from train import trainer

    config = load_config("cnn_digits.py", "smoke")  # 20 steps, evaluations at 10 and 20
    evaluate = trainer.evaluate

    def interrupted_evaluate(task, eval_step, state, mesh):
        if int(jax.device_get(state.step)) == 20:
            os.kill(os.getpid(), signal.SIGINT)
        return evaluate(task, eval_step, state, mesh)

    monkeypatch.setattr(trainer, "evaluate", interrupted_evaluate)
    with pytest.raises(trainer.Interrupted) as info:
        train_and_evaluate(config, str(tmp_path))
    assert "eval/accuracy" in info.value.metrics
    assert "20" in os.listdir(tmp_path / "checkpoints")


def test_ctrl_c_in_the_loop_saves_then_raises_for_a_library_caller(tmp_path, monkeypatch):
    """A caller's own loop (a sweep, a notebook cell) stops on Ctrl-C as on any
    KeyboardInterrupt, once the step reached is saved."""
    from train import trainer

    config = load_config("cnn_digits.py", "smoke")
    config.log_every = 5
    write = trainer.MetricWriter.write

    def write_then_interrupt(self, step, metrics):
        write(self, step, metrics)
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(trainer.MetricWriter, "write", write_then_interrupt)
    with pytest.raises(trainer.Interrupted) as info:
        train_and_evaluate(config, str(tmp_path))
    assert "train/loss" in info.value.metrics
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["5"]  # the step reached


def test_a_second_ctrl_c_does_not_wait_for_the_save():
    """The first Ctrl-C of a running loop asks for a checkpoint at the next step; a user
    who will not wait presses it again."""
    from train.trainer import _Preemption

    with _Preemption() as preempt:
        preempt.deferred()
        os.kill(os.getpid(), signal.SIGINT)
        assert preempt.requested and preempt.stopped_by() == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_application_ends_its_process_on_a_sigterm_while_setting_up(tmp_path):
    """Raising from the signal handler midway through JAX's compilation could crash the
    interpreter as it shut down (a segmentation fault, status 139, in some runs); the
    application, which owns its process, ends it instead: status 0, nothing saved."""
    script = f"""
import os, signal
from tests.test_train_app import load_config
from train import tasks, trainer

build = tasks.build
def preempted_build(*args):
    os.kill(os.getpid(), signal.SIGTERM)
    return build(*args)
tasks.build = preempted_build
trainer.train_and_evaluate(
    load_config("cnn_digits.py", "smoke"), {str(tmp_path / "new")!r}, exit_on_early_sigterm=True
)
print("returned")
"""
    done = _python(script)
    assert "SIGTERM before the first step" in done.stdout and "returned" not in done.stdout
    assert not os.path.exists(tmp_path / "new")  # made by this start, and nothing in it


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_the_application_imports_jax_ends_it_at_once(tmp_path, signum):
    """Was: killed by the signal (status -15) in the seconds before the trainer's own
    handler was in place, importing JAX and the trainer; Ctrl-C there gave a traceback, or
    in some runs a segmentation fault."""
    script = f"""
import builtins, os, signal, sys
from absl import app
import train.__main__ as application

sys.argv = ["train", "--config=configs/cnn_digits.py:smoke", "--workdir={tmp_path / "run"}"]
real_import = builtins.__import__
def importing(name, *args, **kwargs):
    if name == "jax":
        os.kill(os.getpid(), {int(signum)})
    return real_import(name, *args, **kwargs)
builtins.__import__ = importing
app.run(application.main, flags_parser=application.parse_flags)
"""
    done = _python(script, status=-signum if signum == signal.SIGINT else 0)
    assert f"{signum.name} before the first step" in done.stdout


def _python(script: str, status: int = 0) -> subprocess.CompletedProcess:
    """`python -c script` in the repository on one device, which must exit with `status`
    (-N: ended by signal N)."""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=app_env(devices=1),
    )
    assert done.returncode == status, done.stderr[-2000:]
    return done


def test_a_workdir_of_another_task_is_named_as_such(tmp_path):
    """Was: "past total_steps=10; raise total_steps to continue", and after that a
    checkpoint structure mismatch."""
    config = load_config("cnn_digits.py", "smoke")
    config.total_steps = config.checkpoint_every = 2
    train_and_evaluate(config, str(tmp_path))
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ConfigError, match=r"checkpoints of a run of another task \('image_"):
        train_and_evaluate(load_config("lstm_text.py", "smoke"), str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    assert sorted(os.listdir(tmp_path)) == before  # refused before writing anything there


def test_a_run_recorded_with_the_old_optimizer_defaults_resumes_as_it_ran(tmp_path):
    """Runs of versions whose momentum and eps defaults were numbers (0.9, 1e-8 in their
    config.json) resume with them where the config leaves them None (the optimizer's usual
    now): an RMSprop run was refused (another optimizer layout), a LAMB run went on with
    another eps, and every run logged two changes it did not make."""
    from train.trainer import CHANGES_FILE

    config = load_config("cnn_digits.py", "smoke")
    config.optimizer.name = "rmsprop"
    config.optimizer.momentum, config.optimizer.eps = 0.9, 1e-8  # as older versions wrote
    config.total_steps = config.checkpoint_every = 2
    train_and_evaluate(config, str(tmp_path))
    config = load_config("cnn_digits.py", "smoke")
    config.optimizer.name = "rmsprop"
    config.total_steps = config.checkpoint_every = 4
    train_and_evaluate(config, str(tmp_path))
    recorded = json.loads((tmp_path / "config.json").read_text())["optimizer"]
    assert (recorded["momentum"], recorded["eps"]) == (0.9, 1e-8)
    changes = json.loads((tmp_path / CHANGES_FILE).read_text())["changes"]
    assert changes == {"checkpoint_every": [2, 4], "total_steps": [2, 4]}


def test_resuming_with_a_changed_config(tmp_path):
    """Were: another seed, dataset or batch size resumed silently (the data position counts
    batches of the old stream), another optimizer layout failed as an unreadable checkpoint
    that should be deleted, and config.json was overwritten with no trace of the change."""
    from train.trainer import CHANGES_FILE

    config = load_config("cnn_digits.py", "smoke")
    config.total_steps = config.checkpoint_every = 2
    config.log_every = 1
    train_and_evaluate(config, str(tmp_path))
    saved = (tmp_path / "config.json").read_text()
    refused = [
        ("seed", 1, r"config key seed: the run in --workdir .* started with 0, this config has 1"),
        ("batch_size", 64, r"config key batch_size: .* started with 32, .* --config.batch_size=32"),
        ("optimizer.grad_clip_norm", 1.0, r"optimizer.grad_clip_norm 0.0 -> 1.0\): the checkpo"),
        ("optimizer.name", "sgd", r"another layout .*\(optimizer.name 'adam' -> 'sgd'"),
    ]
    for key, value, message in refused:
        changed = load_config("cnn_digits.py", "smoke")
        changed.total_steps = changed.checkpoint_every = 4
        node, name = (changed.optimizer, key.split(".")[1]) if "." in key else (changed, key)
        setattr(node, name, value)
        with pytest.raises(ConfigError, match=message):
            train_and_evaluate(changed, str(tmp_path))
        assert (tmp_path / "config.json").read_text() == saved
        assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    # Only the keys that change the layout are named (was: every changed optimizer key,
    # the learning rate too, which may change).
    changed = load_config("cnn_digits.py", "smoke")
    changed.optimizer.grad_clip_norm, changed.optimizer.learning_rate = 1.0, 1e-4
    with pytest.raises(
        ConfigError, match=r"this config's \(optimizer.grad_clip_norm 0.0 -> 1.0\): "
    ):
        train_and_evaluate(changed, str(tmp_path))
    # Another model is named as such (was: the optimizer's layout, if that differed too,
    # else a checkpoint that does not fit).
    changed = load_config("cnn_digits.py", "smoke")
    changed.model.name, changed.optimizer.name = "ResNet18", "sgd"
    with pytest.raises(ConfigError, match=r"of another model \('SeedCNN'; this config's: 'Res"):
        train_and_evaluate(changed, str(tmp_path))
    assert (tmp_path / "config.json").read_text() == saved
    assert not (tmp_path / CHANGES_FILE).exists()
    # What a resumed run may change is recorded, with the step it took effect.
    config.total_steps, config.optimizer.learning_rate = 4, 0.01
    train_and_evaluate(config, str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / CHANGES_FILE).read_text().splitlines()]
    assert rows == [
        {
            "step": 2,
            "changes": {"optimizer.learning_rate": [0.001, 0.01], "total_steps": [2, 4]},
        }
    ]
    assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 4
    # The logged rate is the one each step applied (was: the old one on the first step after
    # resuming, which the checkpoint's optimizer state held).
    rates = [
        r["train/learning_rate"] for r in logs.read_metrics(str(tmp_path)) if "train/loss" in r
    ]
    np.testing.assert_allclose(rates, [0.001, 0.001, 0.01, 0.01], rtol=1e-6)


def test_another_accumulation_count_on_resuming_is_refused(tmp_path):
    """Was accepted: the saved update count (of 2-step updates) was read on a schedule of
    4-step updates, which had ended: learning rate 0 from then on."""
    config = load_config("cnn_digits.py", "smoke")
    config.total_steps = config.checkpoint_every = 4
    config.optimizer.accumulate_steps = 2
    train_and_evaluate(config, str(tmp_path))
    config.total_steps, config.optimizer.accumulate_steps = 8, 4
    message = r"optimizer.accumulate_steps: .* started with 2, this config has 4; .* counts upd"
    with pytest.raises(ConfigError, match=message):
        train_and_evaluate(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]


def test_resuming_on_another_version_of_the_data_is_refused(tmp_path, monkeypatch):
    """Was: a dataset prepared or installed at another version since the run started was
    read on resuming without a word, from a saved position that counts batches of the old
    data, and the logged evaluation of the old data was taken as this state's."""
    from train import tasks, trainer

    config = load_config("cnn_digits.py", "smoke")
    config.total_steps = config.checkpoint_every = 2
    train_and_evaluate(config, str(tmp_path))
    saved = (tmp_path / "config.json").read_text()
    build = tasks.build

    def newer(*args):
        task = build(*args)
        assert task.datasets == ("sklearn_digits/1.0.0",)  # what the checkpoint records
        return dataclasses.replace(task, datasets=("sklearn_digits/1.1.0",))

    monkeypatch.setattr(tasks, "build", newer)
    config.total_steps = 4
    message = (
        r"trained on sklearn_digits/1\.0\.0, and this run would read sklearn_digits/1\.1\.0.*"
        r"dataset='sklearn_digits:1\.0\.0'"
    )
    with pytest.raises(DataError, match=message):
        train_and_evaluate(config, str(tmp_path))
    assert (tmp_path / "config.json").read_text() == saved
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    # Naming the run's version (as the message says) is no change of dataset: the
    # checkpoints' record decides; another dataset still is one.
    config.dataset = "sklearn_digits:1.0.0"
    assert trainer.resume_changes(config, tasks.resumed_config(str(tmp_path)), str(tmp_path))[
        "dataset"
    ] == (
        "sklearn_digits",
        "sklearn_digits:1.0.0",
    )
    config.dataset = "mnist:3.0.1"
    with pytest.raises(ConfigError, match="config key dataset"):
        trainer.resume_changes(config, tasks.resumed_config(str(tmp_path)), str(tmp_path))
    monkeypatch.setattr(tasks, "build", build)
    config.dataset = "sklearn_digits"
    assert train_and_evaluate(config, str(tmp_path))  # the same data resumes
    # Checkpoints of earlier versions record no datasets: another version named is refused
    # there, as another dataset is.
    pinned = {"dataset": ("sklearn_digits", "sklearn_digits:1.0.0")}
    ckpt = checkpoint.Checkpointer(tmp_path / "checkpoints")
    with pytest.raises(ConfigError, match="do not record its version, this config has 'sklea"):
        trainer._check_datasets({}, None, ckpt, pinned)


def test_a_changed_model_on_resuming_names_the_keys_it_changed(tmp_path):
    """Was: only the checkpoint's shape mismatches, with no word of which key caused them."""
    config = load_config("lstm_text.py", "smoke")
    config.total_steps = config.checkpoint_every = 2
    train_and_evaluate(config, str(tmp_path))
    saved = (tmp_path / "config.json").read_text()
    config.total_steps, config.model.hidden_size = 4, 32
    with pytest.raises(CheckpointError, match=r"(?s)shape mismatch.*started with: model.hidden"):
        train_and_evaluate(config, str(tmp_path))
    assert (tmp_path / "config.json").read_text() == saved
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]


def test_steps_per_sec_leaves_the_evaluations_out(tmp_path, monkeypatch):
    """Was: the time of the evaluation before a logging interval (its compilation too)
    counted as training time, e.g. 1.3 steps/s after an evaluation against 37 before."""
    from train import trainer

    evaluate = trainer.evaluate

    def slow(*args):
        time.sleep(2.0)
        return evaluate(*args)

    monkeypatch.setattr(trainer, "evaluate", slow)
    config = load_config("cnn_digits.py", "smoke")
    config.total_steps, config.eval_every, config.log_every = 6, 2, 2
    train_and_evaluate(config, str(tmp_path))
    rates = {
        r["step"]: r["train/steps_per_sec"]
        for r in logs.read_metrics(str(tmp_path))
        if "train/steps_per_sec" in r
    }
    assert rates[4] > 3 and rates[6] > 3, rates  # 2 steps in well under the 2 s evaluation


def test_where_a_run_stopped(tmp_path):
    """The app's last line says "final" only for a finished run (was: also after a SIGTERM
    at the last step, before its evaluation)."""
    from train.trainer import stopped_at

    config = load_config("cnn_digits.py", "smoke")
    config.total_steps = config.checkpoint_every = 2
    assert stopped_at(str(tmp_path), 2) is None  # nothing yet
    train_and_evaluate(config, str(tmp_path))
    assert stopped_at(str(tmp_path), 2) is None  # finished
    assert stopped_at(str(tmp_path), 4) == 2  # extended: it goes on
    # The last checkpoint is saved before its step's evaluation: a SIGTERM in between
    # leaves no evaluation logged.
    metrics = tmp_path / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    kept = [r for r in rows if not any(k.startswith("eval/") for k in r)]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert stopped_at(str(tmp_path), 2) == 2


def test_an_unreadable_checkpoint_is_not_blamed_on_the_changed_config(tmp_path):
    """Was: the read error, then "This config differs from the one ... total_steps 2 -> 4",
    as if extending the run had broken it."""
    config = load_config("cnn_digits.py", "smoke")
    config.total_steps = config.checkpoint_every = 2
    train_and_evaluate(config, str(tmp_path))
    for path in glob.glob(
        str(tmp_path / "checkpoints" / "2" / "state" / "**" / "*"), recursive=True
    ):
        if os.path.isfile(path) and not path.endswith("_METADATA"):
            os.remove(path)
    config.total_steps = 4
    with pytest.raises(CheckpointError, match="checkpoint .*2") as raised:
        train_and_evaluate(config, str(tmp_path))
    assert "differs" not in str(raised.value)


def test_a_run_that_accumulated_with_an_earlier_version_resumes(tmp_path, monkeypatch):
    """Checkpoints of runs that accumulated gradients before micro-batches were weighted
    hold `optax.MultiSteps`' state. One saved mid-accumulation resumes, and the run ends
    where one of this version does."""
    import shutil

    import optax

    from jaxmodels import optim

    config = load_config("cnn_digits.py", "smoke")
    config.total_steps, config.checkpoint_every, config.eval_every = 6, 2, 0
    # SGD: linear in the gradient, so a gradient off by a factor shows (Adam's first
    # update would hide it).
    config.optimizer.name, config.optimizer.learning_rate = "sgd", 0.1
    config.optimizer.accumulate_steps = 3
    old, new = str(tmp_path / "old"), str(tmp_path / "new")
    with monkeypatch.context() as patch:
        patch.setattr(optim, "accumulate", lambda tx, k: optax.MultiSteps(tx, k))
        train_and_evaluate(config, old)
    for step in ("4", "6"):  # back to step 2: the mean of two batches' gradients saved
        shutil.rmtree(os.path.join(old, "checkpoints", step))
    train_and_evaluate(config, old)
    train_and_evaluate(config, new)
    a, b = saved_params(old, 6), saved_params(new, 6)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-7, err_msg=k)


def test_a_workdir_in_use_is_refused(tmp_path, monkeypatch):
    """Was: a second run on a workdir resumed from the first one's checkpoints while it still
    saved, and one of them crashed in Orbax."""
    from train.trainer import workdir_lock

    config = load_config("cnn_digits.py", "smoke")
    config.total_steps = config.checkpoint_every = 2
    in_use = rf"in use by another run \(process {os.getpid()}\)"
    with workdir_lock(str(tmp_path)), pytest.raises(UserError, match=in_use):
        train_and_evaluate(config, str(tmp_path))
    assert not (tmp_path / "checkpoints").exists()
    # Every process of a run of several is told (was: process 1 failed in Orbax, later).
    with workdir_lock(str(tmp_path)):
        outs = _two_processes("configs/cnn_digits.py:smoke", str(tmp_path), status=2)
    assert all(re.search(in_use, out) for out in outs), outs
    train_and_evaluate(config, str(tmp_path))  # released
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]
    # A start refused as the workdir is in use leaves it be, even one that was not there
    # when it started (was: removed as holding nothing but the other run's lock).
    from train import trainer

    prepare = trainer.prepare_workdir
    with contextlib.ExitStack() as other_run:

        def raced(workdir):
            made = prepare(workdir)
            other_run.enter_context(workdir_lock(made))  # the other run locks it first
            return made

        monkeypatch.setattr(trainer, "prepare_workdir", raced)
        with pytest.raises(UserError, match="in use by another run"):
            train_and_evaluate(config, str(tmp_path / "new"))
        monkeypatch.undo()
        assert os.listdir(tmp_path / "new") == [".lock"]
    # A lock file that cannot be opened is named, on every process.
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / ".lock").mkdir()
    with pytest.raises(UserError, match=r"cannot lock the workdir: .*blocked/\.lock"):
        train_and_evaluate(config, str(tmp_path / "blocked"))
    # The run's files are readable as the umask allows (were owner-only, from mkstemp).
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(tmp_path / "config.json").st_mode & 0o777 == 0o666 & ~umask


def test_an_evaluation_cut_off_by_sigterm_runs_on_resuming(tmp_path, monkeypatch):
    """Was: a SIGTERM at an evaluation step saved and exited before the evaluation, and the
    resumed run went on from the next step: that evaluation was never logged."""
    from train import trainer

    config = load_config("cnn_digits.py", "smoke")  # 20 steps, evaluations at 10 and 20
    write = trainer.MetricWriter.write

    def write_then_preempt(self, step, metrics):
        write(self, step, metrics)
        if step == 10 and "train/loss" in metrics:  # the flush just before the evaluation
            os.kill(os.getpid(), signal.SIGTERM)

    with monkeypatch.context() as patch:
        patch.setattr(trainer.MetricWriter, "write", write_then_preempt)
        train_and_evaluate(config, str(tmp_path))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10"]
    assert not [r for r in logs.read_metrics(str(tmp_path)) if "eval/loss" in r]
    train_and_evaluate(config, str(tmp_path))  # resumed
    evals = [r["step"] for r in logs.read_metrics(str(tmp_path)) if "eval/loss" in r]
    assert evals == [10, 20]
    last = [r for r in logs.read_metrics(str(tmp_path)) if "eval/loss" in r][-1]
    # Its last checkpoint was saved before the evaluation at 20, which it logged: extended,
    # the run takes those metrics, and evaluates only at the new steps (was: evaluated the
    # same state again).
    calls = []
    evaluate = trainer.evaluate
    monkeypatch.setattr(trainer, "evaluate", lambda *a: calls.append(1) or evaluate(*a))
    config.total_steps = 30
    assert train_and_evaluate(config, str(tmp_path))["eval/loss"] != last["eval/loss"]
    assert len(calls) == 1
    evals.append(30)
    assert [r["step"] for r in logs.read_metrics(str(tmp_path)) if "eval/loss" in r] == evals
    # Finished, and run again: the last metrics, from the log.
    logged = {
        k: v for k, v in logs.read_metrics(str(tmp_path))[-1].items() if k.startswith("eval/")
    }
    assert train_and_evaluate(config, str(tmp_path)) == logged
    assert len(calls) == 1
    # With another setting that changes what an evaluation gives: computed, and it replaces
    # the row; run again, the run takes the new one (was: the first one, of float32).
    config.dtype = "bfloat16"
    bf16 = train_and_evaluate(config, str(tmp_path))
    assert bf16["eval/loss"] != logged["eval/loss"]
    assert len(calls) == 2
    assert [r["step"] for r in logs.read_metrics(str(tmp_path)) if "eval/loss" in r] == evals
    assert train_and_evaluate(config, str(tmp_path)) == bf16
    assert len(calls) == 2


def test_a_run_killed_outright_resumes_without_second_rows(tmp_path):
    """Was: the steps a killed run (SIGKILL, OOM, a lost node) had logged after its last
    checkpoint got a second row each when the resumed run took them again."""
    import shutil

    config = load_config("cnn_digits.py", "smoke")  # 20 steps, checkpoints at 10 and 20
    train_and_evaluate(config, str(tmp_path))
    before = logs.read_metrics(str(tmp_path))
    shutil.rmtree(tmp_path / "checkpoints" / "20")  # killed before step 20's save landed
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "train/lo')  # and in the middle of a line
    train_and_evaluate(config, str(tmp_path))
    after = logs.read_metrics(str(tmp_path))
    assert [(r["step"], sorted(r)) for r in after] == [(r["step"], sorted(r)) for r in before]


def test_user_errors_are_user_errors():
    for cls in (CheckpointError, ConfigError, DataError, NonFiniteError):
        assert issubclass(cls, UserError)


def test_metrics_file_is_json_lines(tmp_path):
    config = load_config("cnn_digits.py", "smoke")
    train_and_evaluate(config, str(tmp_path))
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert all("step" in r for r in rows)
    assert any("eval/loss" in r for r in rows)
    assert jax.device_count() == 8


def test_tensorboard_events_when_the_extra_is_installed(tmp_path):
    pytest.importorskip("tensorboardX", reason="needs the tensorboard extra")
    config = load_config("cnn_digits.py", "smoke")
    config.total_steps = 5
    config.eval_every = 5
    train_and_evaluate(config, str(tmp_path))
    events = glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    assert events and os.path.getsize(events[0]) > 100
