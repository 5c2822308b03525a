"""Command line: flags only.

  python -m train --config=configs/cnn_digits.py --workdir=runs/digits \\
      [--config.total_steps=500 --config.batch_size=64 ...]

Multi-process (one process per host, or several on one machine):
  python -m train ... --coordinator_address=HOST:PORT --num_processes=N --process_id=I
or `--distributed` to let `jax.distributed.initialize()` detect the cluster (SLURM, TPU pods, ...).
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from absl import app, flags, logging
from ml_collections import config_flags

from train import STOP_SIGNALS, end_by_sigint, setup_stopped

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/X.py[:variant]).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and logs.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (auto-detect).")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")
flags.mark_flags_as_required(["config", "workdir"])


def _stopped_while_starting(signum: int, frame: Any) -> None:  # noqa: ARG001
    print(setup_stopped(signal.Signals(signum).name), flush=True)
    if signum == signal.SIGINT:
        end_by_sigint()
    os._exit(0)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    multi = FLAGS.coordinator_address or FLAGS.num_processes is not None or FLAGS.distributed
    originals = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    if not multi:
        # Importing JAX and the trainer takes seconds, before the trainer's own handler is
        # in place: a SIGTERM or Ctrl-C then ends the run as one while it sets up does.
        # Several processes keep the default actions, as the trainer's handler does; an
        # ignored SIGINT (a background job of a script) stays ignored.
        for signum, handler in originals.items():
            if handler is not signal.SIG_IGN:
                signal.signal(signum, _stopped_while_starting)
    import jax

    from jaxmodels.errors import UserError

    logging.set_verbosity(logging.WARNING)  # Orbax/TFDS are chatty at INFO
    from train.logs import OneTracebackPerError

    logging.get_absl_logger().addFilter(OneTracebackPerError())

    if multi:
        error = _start_processes(jax)
        if error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            return 2

    from train.trainer import Interrupted, train_and_evaluate

    # The trainer's own handlers take over from here, and give back these when it returns.
    for signum, handler in originals.items():
        signal.signal(signum, handler)
    interrupted = False
    try:
        result = train_and_evaluate(FLAGS.config, FLAGS.workdir, exit_on_early_sigterm=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except Interrupted as e:  # Ctrl-C: saved; the last metrics, then the signal's end
        result, interrupted = e.metrics, True
    if result:
        _print_last_metrics(result, jax.process_index() == 0)
    if interrupted:
        if jax.process_count() > 1:  # every process is here (`Interrupted` is agreed on)
            jax.distributed.shutdown()
        end_by_sigint()
    return 0


def _print_last_metrics(result: dict[str, float], lead: bool) -> None:
    """The app's last line: "final: ..." for a finished run; a run stopped by SIGTERM or
    Ctrl-C has its last metrics, not final ones."""
    from jaxmodels.errors import UserError
    from train.trainer import stopped_at

    total = FLAGS.config.total_steps
    try:
        stopped = stopped_at(FLAGS.workdir, total)
    except (UserError, OSError, ValueError):  # the run's record cannot be read now
        label = "last metrics"
    else:
        label = (
            "final"
            if stopped is None
            else f"last metrics (stopped at step {stopped} of {total}; the same command resumes)"
        )
    if lead:
        print(f"{label}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(result.items())))


_MULTI_PROCESS_USAGE = (
    "give every process --coordinator_address=HOST:PORT (process 0's), --num_processes=N "
    "and its own --process_id (0 to N-1), or --distributed alone on a cluster JAX detects "
    "(SLURM, TPU pods, ...)"
)


def _start_processes(jax: Any) -> str | None:
    """`jax.distributed.initialize` with the flags; the error to print if it cannot."""
    n, i = FLAGS.num_processes, FLAGS.process_id
    if n is not None and n < 1:
        return f"--num_processes={n} must be >= 1: {_MULTI_PROCESS_USAGE}"
    if n is not None and i is not None and not 0 <= i < n:
        return f"--process_id={i} is not between 0 and --num_processes-1={n - 1}"
    from jaxmodels.errors import brief

    try:
        if FLAGS.coordinator_address or n:
            jax.distributed.initialize(
                coordinator_address=FLAGS.coordinator_address, num_processes=n, process_id=i
            )
        else:
            jax.distributed.initialize()
    except Exception as e:  # noqa: BLE001 - JAX's own errors: missing or unreachable peers
        return f"cannot start the multi-process run ({brief(e)}): {_MULTI_PROCESS_USAGE}"
    return None


def _unknown_key(error: KeyError, argv: list[str]) -> str:
    """The message for an override of a key the config lacks: ml_collections' message (the
    key's repr, maybe with a "Did you mean" line) with the override's whole dotted name."""
    text = str(error.args[0]) if error.args else str(error)
    key, _, hint = text.partition("\n")
    key = key.strip("'\"")
    for arg in argv:
        path = arg.removeprefix("--config.").partition("=")[0]
        if arg.startswith("--config.") and path.split(".")[-1] == key:
            key = path
            break
    return "\n".join(filter(None, [f"bad --config override: unknown config key '{key}'", hint]))


def _user_error_in(error: BaseException) -> Exception | None:
    """The first UserError an error was raised from (e.g. a config file's own check, which
    ml_collections re-raises with a traceback in its message), if any."""
    from jaxmodels.errors import UserError

    found, seen = None, error
    while seen is not None:
        if isinstance(seen, UserError):
            found = seen
        seen = seen.__cause__ or seen.__context__
    return found


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with bad flags and config overrides reported in one clean line."""
    try:
        argv = FLAGS(argv)
        if FLAGS.config is not None:
            FLAGS.config.keys()  # a config file that cannot be loaded fails here, not later
        return argv
    except OSError as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        message = f"cannot load the --config file: {lines[-1] if lines else e}"
    except (SyntaxError, ImportError, NameError) as e:  # the config file's own code
        what = (
            f"{e.filename}:{e.lineno}: SyntaxError: {e.msg}" if isinstance(e, SyntaxError) else ""
        )
        message = f"cannot load the --config file: {what or f'{type(e).__name__}: {e}'}"
    except flags.Error as e:
        cause = _user_error_in(e)
        message = str(cause) if cause is not None else str(e)
    except KeyError as e:
        message = _unknown_key(e, argv)
    except (AttributeError, TypeError, ValueError) as e:
        cause = _user_error_in(e)  # e.g. an unknown variant, from the config file itself
        if cause is not None:
            message = str(cause)
        elif isinstance(e, AttributeError) and e.args and isinstance(e.args[0], KeyError):
            message = _unknown_key(e.args[0], argv)  # a misspelt last key comes wrapped
        else:
            message = f"bad --config override: {e}"
    print(
        f"error: {message}\nUsage: python -m train --config=configs/X.py --workdir=DIR "
        "[--config.KEY=VALUE ...]",
        file=sys.stderr,
    )
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
