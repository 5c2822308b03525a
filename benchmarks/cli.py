"""Command line of `python -m benchmarks` (see the package docstring for the usage)."""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
from typing import Any

from benchmarks import errors, report, specs, timing
from benchmarks.errors import UsageError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROG = "python -m benchmarks"


def _parser() -> argparse.ArgumentParser:
    import benchmarks

    parser = argparse.ArgumentParser(
        prog=PROG,
        description=benchmarks.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--suite",
        choices=sorted(specs.SUITES),
        default=None,
        help="workload sizes (default: gpu on a GPU backend, else cpu)",
    )
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these workloads")
    parser.add_argument(
        "--impls",
        nargs="+",
        metavar="IMPL",
        help="run only these of our implementations (e.g. default, no_attn_dropout, scan, "
        "cudnn, flax_rnn); default: every one that applies",
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=None,
        help="global batch size of every workload run (ours and the peers) instead of its own",
    )
    parser.add_argument("--steps", type=int, default=None, help="K: steps per timed window")
    parser.add_argument("--windows", type=int, default=None, help="R: timed windows")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps after the first step"
    )
    parser.add_argument(
        "--devices",
        default="1",
        help='data-parallel devices: "1" (default), a count, or "all"; the batch is global',
    )
    parser.add_argument("--json", metavar="FILE", help="write the rows and metadata as JSON")
    parser.add_argument("--plot", metavar="FILE.png", help="bar chart of items/s (matplotlib)")
    parser.add_argument(
        "--step-rng",
        choices=("threefry", "rbg", "unsafe_rbg"),
        default="threefry",
        help="generator of the dropout bits in our steps (jaxmodels.training.step_key)",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a model setting for our runs (repeatable), e.g. --set scan_layers=True or "
        "--set remat_policy=dots: a BertConfig field for BERT, a constructor argument for "
        "the other families; values are Python literals, else strings. Shown in the note",
    )
    parser.add_argument(
        "--xla-flags",
        metavar="FLAGS",
        help="XLA flags for our workload processes (appended to XLA_FLAGS; not the peers'), "
        "e.g. --xla-flags=--xla_gpu_enable_latency_hiding_scheduler=true, or "
        "--xla-flags=--xla_dump_to=DIR for XLA's HLO dumps. Shown in the note",
    )
    parser.add_argument(
        "--profile",
        metavar="DIR",
        help="also profile each of our steps after timing it: optimised HLO, XLA cost and "
        "memory analysis, a jax.profiler trace and a summary of where the time goes, under "
        "DIR/<workload>[-<impl>]/ (benchmarks.profile)",
    )
    parser.add_argument(
        "--peers", action="store_true", help="also time the PyTorch peers (separate process)"
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="one device's peak TFLOP/s for MFU of every row but TF32 ones (default: the "
        "table in benchmarks.specs by device kind)",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every workload in this process (faster to start; peak memory is then only "
        "reported for the first workload)",
    )
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds allowed per workload process"
    )
    # Internal: one workload process (or the probe) started by the suite.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--impl", default="", help=argparse.SUPPRESS)
    return parser


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Stopped(BaseException):
    """SIGTERM or SIGINT (Ctrl-C) while the suite runs (`_STOP`). The running workload's
    process group is killed, the workloads not yet run are left out, and the table and
    files still get every row measured before."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _StopRequest:
    """SIGTERM and SIGINT as a request to stop (`handling()`, in the main thread only).

    `Stopped` is raised only where the suite can act on it: inside `interruptible()` (a
    wait on a child process, which the waiter then kills) and at `check()`, between
    workloads. After the first signal, SIGTERM is ignored (`timeout` sends it to the
    process and again to its group) and SIGINT is Python's own again: a second Ctrl-C
    does not wait for the report."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._waiting = False
        self._handled: set[int] = set()

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        if self.signum is None:
            self.signum = signum
            if signal.SIGTERM in self._handled:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            if signal.SIGINT in self._handled:
                signal.signal(signal.SIGINT, signal.default_int_handler)
        if self._waiting:
            raise Stopped(signum)

    def check(self) -> None:
        if self.signum is not None:
            raise Stopped(self.signum)

    @contextlib.contextmanager
    def interruptible(self) -> Any:
        self._waiting = True  # before the check: a signal in between is not only noted
        try:
            self.check()
            yield
        finally:
            self._waiting = False

    @contextlib.contextmanager
    def handling(self) -> Any:
        self.signum = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        # A SIGINT ignored from the start (a background job of a script) stays ignored.
        signums = [
            s for s in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(s) is not signal.SIG_IGN
        ]
        self._handled = set(signums)
        old = {s: signal.signal(s, self._handle) for s in signums}
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
            self._handled = set()


_STOP = _StopRequest()


# ---------------------------------------------------------------------------------------------
# Inside a JAX process: the probe (what runs here) and the workload runs.


def _probe(args: argparse.Namespace) -> dict[str, Any]:
    """Suite, device and the (workload, impl) jobs of this machine; skipped rows."""
    import flax
    import jax

    from benchmarks import measure, workloads

    suite = args.suite or ("gpu" if jax.default_backend() == "gpu" else "cpu")
    devices = measure.devices_for(args.devices)
    jobs, skipped = [], []
    known: set[str] = set()
    for w in specs.suite(suite, args.only, args.batch):
        if w.family not in workloads.BUILDERS:
            skipped.append(
                timing.empty_row(
                    w,
                    "jax",
                    "jax",
                    status="skipped",
                    note=workloads.NOT_BUILT,
                    device=measure.device_label(devices),
                )
            )
            continue
        measure.check_split(w, len(devices))
        unknown = sorted(set(model_overrides(args.set)) - set(workloads.settings(w)))
        if unknown:
            raise UsageError(
                f"--set {' '.join(unknown)}: {w.name} has no such model setting; "
                f"choose from {workloads.settings(w)}"
            )
        for key, value in model_overrides(args.set).items():
            error = workloads.setting_error(w, key, value)
            if error:
                raise UsageError(f"--set {error}")
        # "default": each workload's first implementation (as in benchmarks.compiled).
        known.add("default")
        for n, impl in enumerate(workloads.impls(w)):
            known.add(impl or "default")
            chosen = (impl or "default") in args.impls if args.impls else True
            if chosen or (n == 0 and "default" in (args.impls or ())):
                jobs.append((w.name, impl))
    unknown = sorted(set(args.impls or ()) - known)
    if unknown:
        raise UsageError(
            f"--impls {' '.join(unknown)}: no such implementation of these workloads here; "
            f"choose from {sorted(known)}"
        )
    return {
        "suite": suite,
        "backend": jax.default_backend(),
        "device": measure.device_label(devices),
        "device_kind": devices[0].device_kind,
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "jobs": jobs,
        "skipped": skipped,
    }


def model_overrides(settings: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` settings as a dict; a VALUE that is no Python literal is a string,
    but true and false in any case are the bools."""
    out: dict[str, Any] = {}
    for setting in settings:
        key, sep, text = setting.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--set {setting!r}: expected KEY=VALUE, e.g. scan_layers=True")
        if text.lower() in ("true", "false"):
            out[key] = text.lower() == "true"
            continue
        try:
            out[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            out[key] = text
    return out


def _timing_args(args: argparse.Namespace, suite: str) -> tuple[int, int, int]:
    return timing.protocol(suite, args.steps, args.windows, args.warmup)


def _check_numbers(args: argparse.Namespace) -> None:
    """Numeric flags that cannot make a measurement fail before anything starts."""
    for flag, value, least in (
        ("--steps", args.steps, 1),
        ("--windows", args.windows, 1),
        ("--warmup", args.warmup, 0),
    ):
        if value is not None and value < least:
            raise UsageError(f"{flag} must be >= {least}, got {value}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise UsageError(f"--peak-tflops must be > 0 (TFLOP/s), got {args.peak_tflops}")
    if args.devices != "all" and not (args.devices.isdecimal() and int(args.devices) >= 1):
        raise UsageError(f'--devices takes a count (>= 1) or "all", got {args.devices!r}')
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be > 0 (seconds per process), got {args.timeout}")
    if args.json:
        errors.check_output_file("--json", args.json)
    if args.plot:
        errors.check_output_file("--plot", args.plot, errors.plot_endings())
    if args.profile:
        errors.check_output_folder("--profile", args.profile)


def _stopped_rows(
    by_name: dict[str, specs.Workload],
    jobs: list[tuple[str, str]],
    device: str,
    stopped: Stopped,
    running: bool,
) -> list[dict[str, Any]]:
    """Rows for `jobs` that `stopped` left unmeasured (the first one `running`)."""
    return [
        timing.empty_row(
            by_name[name],
            specs.impl_label(impl),
            "jax",
            device=device,
            status="stopped",
            note=f"{stopped} {'while it ran' if running and i == 0 else 'before it ran'}",
        )
        for i, (name, impl) in enumerate(jobs)
    ]


def _run_here(
    args: argparse.Namespace, suite: str, jobs: list[tuple[str, str]]
) -> tuple[list[dict[str, Any]], Stopped | None]:
    """Measures `jobs` in this process: their rows, and the `Stopped` that ended them early
    (with `--in-process`, between workloads: a measurement in this process runs to its
    end; a workload process is killed by the suite instead)."""
    from benchmarks import measure
    from jaxmodels.errors import brief

    by_name = {w.name: w for w in specs.suite(suite, None, args.batch)}
    devices = measure.devices_for(args.devices)
    steps, windows, warmup = _timing_args(args, suite)
    rows = []
    for i, (name, impl) in enumerate(jobs):
        try:
            _STOP.check()
        except Stopped as e:
            device = measure.device_label(devices)
            return rows + _stopped_rows(by_name, jobs[i:], device, e, running=False), e
        _log(f"[{i + 1}/{len(jobs)}] {name} {specs.impl_label(impl)} ...")
        try:
            with timing.without_compilation_cache():
                row = measure.measure(
                    by_name[name],
                    impl,
                    devices,
                    steps,
                    windows,
                    warmup,
                    args.peak_tflops,
                    report_memory=i == 0,
                    step_rng=args.step_rng,
                    profile_dir=args.profile and os.path.abspath(args.profile),
                    model_overrides=model_overrides(args.set),
                )
        except Exception as e:
            if not args.in_process:
                # A workload process: its exit status and last line tell the suite. The
                # traceback first, then the error's own line (JAX ends a traceback with a
                # footer of its own, which would be the last line).
                traceback.print_exc()
                sys.stdout.flush()
                print(brief(e), file=sys.stderr, flush=True)
                raise SystemExit(1) from None
            # As a workload process's failure: its row, and the other workloads go on.
            error = brief(e)
            _log(f"    failed: {error}")
            label = specs.impl_label(impl)
            device = measure.device_label(devices)
            row = timing.empty_row(
                by_name[name], label, "jax", device=device, status="failed", note=error
            )
        if i > 0 and args.in_process and timing.peak_memory_bytes(devices) is not None:
            row["note"] = "; ".join(
                filter(None, [row["note"], "peak mem: only in a fresh process"])
            )
        rows.append(row)
    return rows, None


def _worker(args: argparse.Namespace) -> int:
    result: Any
    if args.probe:
        result = _probe(args)
    else:
        result, _ = _run_here(args, args.suite, [(args.only[0], args.impl)])
    with open(args.json, "w") as f:
        json.dump(result, f)
    return 0


# ---------------------------------------------------------------------------------------------
# The suite: a probe process, one process per workload, the peer process.


def _child(
    cmd: list[str],
    timeout: float,
    echo: bool = False,
    xla_flags: str | None = None,
    new_group: bool = True,
    refuses: bool = False,
) -> tuple[Any, str | None]:
    """Runs `python -m <cmd...> --json TMP`; returns (parsed JSON, None) or (None, error).

    The child's output is kept for the error message, and echoed to stderr if `echo`.
    `xla_flags` are appended to the child's XLA_FLAGS. With `new_group` the child runs in
    a process group of its own, all of which a timeout kills (the peer process's Keras
    children included, which therefore stay in its group: `new_group=False`). With
    `refuses`, a child that refused its command line raises its `UsageError` here.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "out.json")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
        if xla_flags:
            env["XLA_FLAGS"] = " ".join(filter(None, [env.get("XLA_FLAGS"), xla_flags]))
        proc = subprocess.Popen(
            [sys.executable, "-m", *cmd, "--json", out],
            # cwd: the caller's, so relative paths (in --xla-flags too) mean what they say
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=new_group,
        )
        lines: list[str] = []

        def read() -> None:
            for line in proc.stdout:
                lines.append(line.rstrip())
                if echo:
                    _log(f"    {line.rstrip()}")

        reader = threading.Thread(target=read, daemon=True)
        reader.start()

        def kill() -> None:
            if new_group:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait()

        try:
            with _STOP.interruptible():
                proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill()
            return None, f"timed out after {timeout:.0f} s"
        except BaseException as e:  # `Stopped`: no process of ours goes on holding the device
            if not (isinstance(e, Stopped) and proc.poll() is not None):
                kill()
                raise
            # It had ended as the signal came: its result counts; the stop is seen next.
        finally:
            reader.join(timeout=10)
        tail = [ln.strip() for ln in lines if ln.strip()]
        if refuses and proc.returncode == errors.USAGE_STATUS and tail:
            raise UsageError(errors.message(tail[-1], PROG))
        if proc.returncode != 0 or not os.path.exists(out):
            return None, (tail[-1] if tail else f"exit status {proc.returncode}")[:300]
        with open(out) as f:
            return json.load(f), None


def _sizing_flags(args: argparse.Namespace) -> list[str]:
    """The flags our workload processes and the peer process share: batch and timing."""
    flags = ["--batch", str(args.batch)] if args.batch else []
    for name in ("steps", "windows", "warmup", "peak_tflops"):
        value = getattr(args, name)
        if value is not None:
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return flags


def _common_flags(args: argparse.Namespace) -> list[str]:
    """The flags of our workload processes."""
    flags = ["--devices", args.devices, "--step-rng", args.step_rng, *_sizing_flags(args)]
    flags += ["--profile", os.path.abspath(args.profile)] if args.profile else []
    for setting in args.set:
        flags += ["--set", setting]
    return flags


def _run_suite(
    args: argparse.Namespace,
) -> tuple[dict[str, Any], list[dict[str, Any]], Stopped | None]:
    """The probe's facts, our rows, and the `Stopped` that ended the run early (rows for the
    workloads it left unmeasured are among the rows)."""
    if args.in_process:
        info = _probe(args)
        return info, *_run_here(args, info["suite"], [tuple(j) for j in info["jobs"]])

    probe_cmd = ["benchmarks", "--worker", "--probe", "--devices", args.devices]
    probe_cmd += ["--suite", args.suite] if args.suite else []
    probe_cmd += ["--only", *args.only] if args.only else []
    probe_cmd += ["--batch", str(args.batch)] if args.batch else []
    probe_cmd += ["--impls", *args.impls] if args.impls else []
    for setting in args.set:
        probe_cmd += ["--set", setting]
    info, error = _child(probe_cmd, args.timeout, xla_flags=args.xla_flags, refuses=True)
    if info is None and _refused_flag(args.xla_flags, error):
        raise UsageError(f"--xla-flags {args.xla_flags}: XLA refused them: {error}")
    if info is None:
        raise SystemExit(f"the JAX probe process failed: {error}")
    by_name = {w.name: w for w in specs.suite(info["suite"], None, args.batch)}
    rows = []
    jobs = info["jobs"]
    for i, (name, impl) in enumerate(jobs):
        label = specs.impl_label(impl)
        cmd = ["benchmarks", "--worker", "--suite", info["suite"], "--only", name]
        cmd += ["--impl", impl, *_common_flags(args)]
        started = False
        try:
            _STOP.check()
            _log(f"[{i + 1}/{len(jobs)}] {name} {label} ...")
            started = True
            result, error = _child(cmd, args.timeout, xla_flags=args.xla_flags)
        except Stopped as e:
            _log(f"    stopped: {e}")
            stopped = _stopped_rows(by_name, jobs[i:], info["device"], e, running=started)
            return info, rows + stopped, e
        if result is None:
            _log(f"    failed: {error}")
            result = [
                timing.empty_row(
                    by_name[name], label, "jax", device=info["device"], status="failed", note=error
                )
            ]
        else:
            _log(
                f"    {result[0]['step_ms']:.2f} ms/step, "
                f"first step {result[0]['first_step_s']:.1f} s"
            )
            if result[0].get("profile"):  # the profile's summary, as --in-process prints it
                with open(os.path.join(result[0]["profile"], "summary.txt")) as f:
                    _log(f.read().rstrip())
        if args.xla_flags:
            for row in result:
                row["note"] = "; ".join(filter(None, [row["note"], f"XLA_FLAGS {args.xla_flags}"]))
        rows += result
    return info, rows, None


def _refused_flag(flags: str | None, error: str | None) -> bool:
    """Whether XLA's start-up `error` refuses one of our `--xla-flags` (not one of the
    environment's own XLA_FLAGS)."""
    if not flags or not error or "XLA_FLAGS" not in error:
        return False
    return any(flag.split("=")[0] in error for flag in flags.split())


def _run_peers(
    args: argparse.Namespace, suite: str, rows: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], str | None]:
    forward = {r["workload"]: r["forward_flops"] for r in rows if r.get("forward_flops")}
    cmd = ["benchmarks.peers", "--suite", suite]
    cmd += ["--only", *args.only] if args.only else []
    cmd += ["--flops", *[f"{k}={v}" for k, v in forward.items()]] if forward else []
    cmd += [*_sizing_flags(args), "--timeout", str(args.timeout)]
    _log("peers (PyTorch, separate process) ...")
    workloads = specs.suite(suite, args.only, args.batch)
    # Up to three peers per workload (eager, torch.compile, Keras), each given --timeout.
    result, error = _child(cmd, 3 * args.timeout * max(1, len(workloads)), echo=True)
    if result is None:
        return [], f"peer process failed: {error}"
    return result, None


# What the numbers depend on besides jax and flax: XLA's GPU plugin and the CUDA libraries
# (pip's; PyTorch's wheels use the same), optax.
STACK_PACKAGES = (
    "jaxlib",
    "optax",
    *(f"jax-cuda{v}-{part}" for v in (12, 13) for part in ("plugin", "pjrt")),
    *(f"nvidia-{lib}-cu{v}" for v in (12, 13) for lib in ("cudnn", "cublas", "nccl")),
)
PEER_PACKAGES = ("torch", "torchvision", "transformers", "keras")


def _versions(packages: tuple[str, ...]) -> dict[str, str]:
    """The versions of those of `packages` installed here (the Python of every process)."""
    found = {}
    for package in packages:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    return found


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.worker:
        return _worker(args)
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise UsageError(report.MATPLOTLIB_MISSING)
    for suite in specs.SUITES:  # fail on a misspelt --only or a bad --batch before starting
        specs.suite(suite, args.only, args.batch)
    if model_overrides(args.set) and not args.only:
        raise UsageError(
            "--set changes a setting of one model family: name its workloads with --only"
        )
    if args.peers and args.devices != "1":
        raise UsageError(
            "--peers runs on one device, so their ratios compare one device with one: "
            "use --devices 1 (the default) with --peers"
        )
    if args.set and args.peers:
        raise UsageError(
            "--set changes our model but not the peers': compare with --peers in a run "
            "without --set"
        )
    if args.xla_flags and args.in_process:
        raise UsageError(
            "--xla-flags takes effect when XLA starts, in each workload's own process: "
            "drop --in-process"
        )
    _check_numbers(args)  # after the checks above: it makes the --profile folder

    started = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    # SIGTERM or Ctrl-C: the running process group is killed, and what was measured is
    # still reported (`_StopRequest`).
    with _STOP.handling():
        try:
            info, rows, stopped = _run_suite(args)
        except Stopped as e:  # in the probe: nothing measured, nothing to write
            _log(f"{PROG}: stopped by {e} before anything was measured")
            return 128 + e.signum
        rows += info["skipped"]
        peer_error = None
        if args.peers and stopped is None:
            try:
                peer_rows, peer_error = _run_peers(args, info["suite"], rows)
            except Stopped as e:
                peer_rows, peer_error, stopped = [], f"peer process stopped by {e}", e
            rows += peer_rows
        status = _report(args, argv, started, info, rows, stopped, peer_error)
        # A signal after the last measurement: all was reported, but the run was stopped.
        return 128 + _STOP.signum if _STOP.signum is not None else status


def _report(
    args: argparse.Namespace,
    argv: list[str] | None,
    started: str,
    info: dict[str, Any],
    rows: list[dict[str, Any]],
    stopped: Stopped | None,
    peer_error: str | None,
) -> int:
    """Prints the table, writes the files; `main`'s exit status."""
    order = [w.name for w in specs.SUITES[info["suite"]]]
    rows = report.sort_rows(rows, order)
    report.add_ratios(rows)

    steps, windows, warmup = _timing_args(args, info["suite"])
    argv_text = sys.argv[1:] if argv is None else argv
    metadata = {
        "date": started,
        "suite": info["suite"],
        "device": info["device"],
        "device_kind": info["device_kind"],
        "backend": info["backend"],
        "jax_version": info["jax_version"],
        "flax_version": info["flax_version"],
        "command": shlex.join(["python", "-m", "benchmarks", *argv_text]),
        "steps_per_window": steps,
        "windows": windows,
        "warmup_steps": warmup,
        "step_rng": args.step_rng,
        "model_overrides": model_overrides(args.set),
        "batch_override": args.batch,
        "xla_flags": args.xla_flags,
        "peers": args.peers,
        "peer_error": peer_error,
        "peer_versions": _versions(PEER_PACKAGES) if args.peers else None,
        "stack_versions": _versions(STACK_PACKAGES),
        # One device's peak FLOP/s (in TFLOP/s, by precision) the MFU column is against.
        "peak_tflops": (
            {"given": args.peak_tflops}
            if args.peak_tflops is not None
            else {k: v / 1e12 for k, v in specs.PEAK_FLOPS.get(info["device_kind"], {}).items()}
        ),
        "stopped_by": str(stopped) if stopped else None,
    }
    peaks = ", ".join(f"{k} {v:g}" for k, v in metadata["peak_tflops"].items())
    print(
        f"# {metadata['date']}  suite {info['suite']}  {info['device']}  jax {info['jax_version']}"
        f"  K={steps} steps x R={windows} windows (median), {warmup} warm-up"
        + (f"  MFU peak TFLOP/s: {peaks}" if peaks else "")
    )
    print(report.format_table(rows))
    if peer_error:
        print(peer_error)
    if args.json:
        report.write_json(args.json, rows, metadata)
    if args.plot:
        report.plot(args.plot, rows, f"{info['suite']} suite, {info['device']}")
    if stopped:
        _log(f"{PROG}: stopped by {stopped}; the rows above are what was measured before")
        return 128 + stopped.signum  # `python -m benchmarks` then ends by that signal
    # Status 1 when one of our workloads (or the whole peer process) failed; the table and
    # the files still hold every row.
    failed = [r for r in rows if r.get("status") == "failed" and r.get("framework") == "jax"]
    return 1 if failed or peer_error else 0
