"""`train_and_evaluate(config, workdir)`: sharded init, the loop, eval, checkpoints, logs.

The loop keeps Python out of the device's way: steps are dispatched asynchronously, the
next batch is read while the device computes, and the host waits for results only every
`log_every` steps (and before each checkpoint, so that no checkpoint ever holds a state
from after a non-finite loss).

Resuming is automatic: if `workdir/checkpoints` holds a complete checkpoint, the state and
the data iterator's position are restored from it, and the run continues as if it had
never stopped (bitwise on CPU). SIGTERM (preemption) saves a checkpoint, then returns;
Ctrl-C saves one, then raises `Interrupted`.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import os
import re
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxmodels import checkpoint, optim, sharding, training
from jaxmodels.errors import (
    CheckpointError,
    CheckpointMismatchError,
    ConfigError,
    DataError,
    NonFiniteError,
    UserError,
    brief,
    leaves_by_name,
)
from train import STOP_SIGNALS, end_by_sigint, logs, setup_stopped, tasks
from train.defaults import base_config
from train.logs import MetricWriter, logged_eval


def _flat(c: Any, prefix: str = "", *, into_model: bool = False) -> dict[str, Any]:
    """{dotted key: value} of a config; `model` (free-form) is one value unless `into_model`."""
    out = {}
    for k, v in c.items():
        if isinstance(v, ml_collections.ConfigDict | dict) and (into_model or k != "model"):
            out.update(_flat(v, f"{prefix}{k}.", into_model=into_model))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Model keys that are sizes or counts (hidden_size, num_layers, head_dim, ...): at least 1.
_MODEL_COUNT = re.compile(r"num_\w+|\w+_(size|dim|layers|heads|filters|features)")


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Unknown keys and inconsistent values fail here, naming the key."""
    known = _flat(base_config())
    known_prefixes = {k.rsplit(".", i)[0] for k in known for i in range(k.count(".") + 1)}
    for full in _flat(config):
        if full in known:
            continue
        parts = full.split(".")
        prefixes = [".".join(parts[: i + 1]) for i in range(len(parts))]
        key = next((p for p in prefixes if p not in known_prefixes), full)
        close = difflib.get_close_matches(key, known_prefixes, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config key {key!r}{hint}")
    for key in (
        "total_steps",
        "batch_size",
        "log_every",
        "max_length",
        "max_predictions",
        "image_size",
    ):
        if int(config[key]) <= 0:
            raise ConfigError(f"config key {key} must be > 0, got {config[key]}")
    for key in (
        "eval_every",
        "checkpoint_every",
        "eval_batch_size",
        "num_classes",
        "profile_steps",
        "profile_skip_steps",
        "seed",
        "eval_examples",
        "data_threads",
        "prefetch",
    ):
        if int(config[key]) < 0:
            raise ConfigError(f"config key {key} must be >= 0, got {config[key]}")
    for key, value in config.model.items():  # (found otherwise at the first train step)
        if "dropout" in key and isinstance(value, (int, float)) and not 0 <= value < 1:
            raise ConfigError(f"config key model.{key} must be in [0, 1), got {value}")
        # (found otherwise where the model first uses it: a ZeroDivisionError, a reshape)
        if _MODEL_COUNT.fullmatch(key) and type(value) is int and value < 1:
            raise ConfigError(
                f"config key model.{key} must be >= 1 (a size or a count), got {value}"
            )
    if int(config.vocab_size) < 2:
        raise ConfigError(
            f"config key vocab_size must be >= 2 (padding and unknown words), got "
            f"{config.vocab_size}"
        )
    for key, allowed in (("name", optim.OPTIMIZERS), ("schedule", optim.SCHEDULES)):
        if config.optimizer[key] not in allowed:
            close = difflib.get_close_matches(str(config.optimizer[key]), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(
                f"config key optimizer.{key}: {config.optimizer[key]!r} is not one of "
                f"{', '.join(allowed)}{hint}"
            )
    for key in ("weight_decay", "momentum", "grad_clip_norm"):
        if config.optimizer[key] is not None and float(config.optimizer[key]) < 0:
            raise ConfigError(
                f"config key optimizer.{key} must be >= 0, got {config.optimizer[key]}"
                + (" (0: no clipping)" if key == "grad_clip_norm" else "")
            )
    if int(config.optimizer.accumulate_steps) < 1:
        raise ConfigError(
            f"config key optimizer.accumulate_steps must be >= 1, got "
            f"{config.optimizer.accumulate_steps}"
        )
    k = int(config.optimizer.accumulate_steps)
    if int(config.total_steps) % k:
        raise ConfigError(
            f"config key total_steps={config.total_steps} is not a multiple of "
            f"optimizer.accumulate_steps={k}: the last {int(config.total_steps) % k} batches "
            f"would be accumulated and never applied; use total_steps="
            f"{int(config.total_steps) // k * k or k}"
        )
    if not 0 <= int(config.optimizer.warmup_steps) <= int(config.total_steps):
        raise ConfigError(
            f"config key optimizer.warmup_steps={config.optimizer.warmup_steps} must be between "
            f"0 and total_steps={config.total_steps} (both count training steps)"
        )
    if config.step_rng not in training.STEP_RNG_IMPLS:
        raise ConfigError(
            f"config key step_rng: {config.step_rng!r} is not one of {training.STEP_RNG_IMPLS}"
        )
    if config.keep_checkpoints < 1:
        raise ConfigError("config key keep_checkpoints must be >= 1")
    try:
        dtype = jnp.dtype(config.dtype)
    except TypeError as e:
        raise ConfigError(f"config key dtype: {config.dtype!r} is not a dtype") from e
    usable = ("float32", "bfloat16", "float16")
    if dtype.name == "float64" and not jax.config.jax_enable_x64:
        raise ConfigError(
            "config key dtype: 'float64' computes in float32 unless JAX's 64-bit mode is on "
            f"(JAX_ENABLE_X64=1); use one of {usable}, or turn that mode on"
        )
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ConfigError(
            f"config key dtype: {config.dtype!r} is not a floating-point dtype; use one of {usable}"
        )
    if len(config.image_mean) != len(config.image_std):
        raise ConfigError("config keys image_mean and image_std must have the same length")
    if not all(float(s) > 0 for s in config.image_std):  # NaN too
        raise ConfigError(
            f"config key image_std: {tuple(config.image_std)} divides the images; every value "
            "must be > 0 (e.g. (1.0,) for none)"
        )
    if not 0 <= float(config.label_smoothing) < 1:
        raise ConfigError(
            f"config key label_smoothing must be in [0, 1) (0: none), got {config.label_smoothing}"
        )
    if not float(config.optimizer.learning_rate) > 0:
        raise ConfigError(
            f"config key optimizer.learning_rate must be > 0 (the peak rate), got "
            f"{config.optimizer.learning_rate}"
        )
    o = config.optimizer
    ignored = [f"optimizer.{k}={o[k]}" for k in ("momentum", "nesterov") if o[k]]
    if ignored and o.name not in optim.MOMENTUM_OPTIMIZERS and jax.process_index() == 0:
        print(
            f"warning: config {'keys' if len(ignored) > 1 else 'key'} {' and '.join(ignored)} "
            f"{'have' if len(ignored) > 1 else 'has'} no effect on {o.name}, which has "
            f"no momentum (its first moment decays by optimizer.b1, here {o.b1}); momentum "
            f"and nesterov are for {', '.join(optim.MOMENTUM_OPTIMIZERS)}",
            file=sys.stderr,
            flush=True,
        )


def _check_batch(config: Any, mesh: Any) -> None:
    ways = sharding.batch_parallelism(mesh)
    _, procs = _batch_part(mesh)  # the parts the processes feed
    for key in ("batch_size", "eval_batch_size"):
        b = int(config[key]) or int(config.batch_size)
        if b % ways or b % procs:
            raise ConfigError(
                f"{key}={b} is not divisible by the data-parallel size {ways} "
                f"(mesh data x fsdp over {jax.device_count()} devices, fed in {procs} part(s)); "
                f"use a multiple of {np.lcm(ways, procs)}"
            )


def prepare_workdir(workdir: str) -> str:
    """Creates `workdir` and checks that it is writable."""
    if not workdir.strip():
        raise UserError("--workdir is empty; name the directory for the run's checkpoints and logs")
    workdir = os.path.abspath(workdir)
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir} is a file; pass a folder (a new one is created)")
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, f".write_test.{jax.process_index()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(
            f"workdir {workdir} is not writable ({e.strerror}); pass a --workdir you can write to"
        ) from e
    return workdir


LOCK_FILE = ".lock"


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[None]:
    """Holds `workdir/.lock` (process 0) for the block: a second run started on the same
    workdir is a `UserError` (on each of its processes: process 0 tells the others) instead
    of two runs saving over each other's checkpoints. A filesystem without locks (some
    network ones) runs unlocked."""
    with contextlib.ExitStack() as held:
        refusal = None
        if jax.process_index() == 0:
            path = os.path.join(workdir, LOCK_FILE)
            try:
                holder = _lock(held.enter_context(open(path, "a+", encoding="utf-8")))
            except OSError as e:
                refusal = (
                    f"cannot lock the workdir: {path} ({e.strerror or e}); check its "
                    "permissions, or use another --workdir"
                )
            else:
                if holder is not None:
                    refusal = (
                        f"--workdir {workdir} is in use by another run (process {holder}); "
                        "let it finish or stop it, or use another --workdir"
                    )
        refusal = _from_lead(refusal)
        if refusal is not None:
            raise UserError(refusal)
        yield  # closing the file releases the lock


def _lock(f: Any) -> str | None:
    """Locks the open file `f` and writes this pid in it; None, or the holder's pid where
    another process holds it. A filesystem without locks: None, unlocked."""
    import fcntl

    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        return f.read().strip() or "?"
    except OSError:  # no locks here
        return None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return None


def _remove_if_unused(workdir: str) -> None:
    """Removes a workdir this start created and failed in before writing anything of the
    run (process 0): the lock, a compilation cache and the vocabulary made for the run
    (made anew by the next start, see `tasks.resuming`) alone are not worth keeping."""
    from train.tasks.bert_finetune import INIT_RECORD
    from train.tasks.bert_pretraining import VOCAB_FILE
    from train.tasks.text_classification import TOKENIZER_FILE

    if jax.process_index() != 0:
        return
    try:
        if not set(os.listdir(workdir)) <= {
            LOCK_FILE,
            "compilation_cache",
            TOKENIZER_FILE,
            VOCAB_FILE,
            INIT_RECORD,
        }:
            return
        shutil.rmtree(workdir)
    except OSError:
        pass  # what cannot be removed stays: it holds nothing of the run either


@contextlib.contextmanager
def compilation_cache(setting: str, workdir: str) -> Iterator[str | None]:
    """JAX's persistent compilation cache at `setting` (see `compilation_cache_dir` in
    train/defaults.py) for the block, which gets the directory (None: off); the previous
    setting of this process is restored afterwards."""
    from jax.experimental.compilation_cache import compilation_cache as cache

    given = "config key compilation_cache_dir"
    if setting == "auto":
        from_env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
        setting = from_env or os.path.join(workdir, "compilation_cache")
        given = "$JAX_COMPILATION_CACHE_DIR" if from_env else "compilation_cache_dir='auto'"
    path = os.path.abspath(os.path.expanduser(setting)) if setting else None
    if path and os.path.exists(path) and not os.path.isdir(path):  # JAX only warns
        raise ConfigError(
            f"{given}: {path} is a file; name a folder (made if missing) in config key "
            "compilation_cache_dir, or '' for no cache"
        )
    previous = jax.config.jax_compilation_cache_dir

    def point_at(directory: str | None) -> None:
        if jax.config.jax_compilation_cache_dir != directory:
            cache.set_cache_dir(directory)
            cache.reset_cache()  # the cache opened for the old directory is dropped

    point_at(path)
    try:
        yield path
    finally:
        point_at(previous)


def _schedule_args(config: Any) -> dict[str, Any]:
    """`total_steps` and `optimizer.warmup_steps` count training steps (batches); with
    `accumulate_steps` k the schedule advances once per update, every k steps, so both are
    divided by k here."""
    o = config.optimizer
    return dict(
        learning_rate=o.learning_rate,
        total_steps=config.total_steps // o.accumulate_steps,
        warmup_steps=o.warmup_steps // o.accumulate_steps,
        schedule=o.schedule,
        end_factor=o.end_factor,
    )


def _make_optimizer(config: Any) -> Any:
    """The optimizer of `config`, its schedule as `_schedule_args` says."""
    o = config.optimizer
    # Momentum keys of an optimizer without momentum are ignored (`validate_config` warns
    # of those the config sets; records of earlier versions hold momentum 0.9 for all).
    uses_momentum = o.name in optim.MOMENTUM_OPTIMIZERS
    return optim.make_optimizer(
        o.name,
        **_schedule_args(config),
        weight_decay=o.weight_decay,
        momentum=o.momentum if uses_momentum else None,
        nesterov=o.nesterov if uses_momentum else False,
        b1=o.b1,
        b2=o.b2,
        eps=o.eps,
        grad_clip_norm=o.grad_clip_norm or None,
        accumulate_steps=o.accumulate_steps,
    )


@functools.cache
def _batch_part(mesh: Any) -> tuple[int, int]:
    """`sharding.process_batch_part(mesh)`, worked out once per mesh."""
    return sharding.process_batch_part(mesh)


def _global_batch(local: dict[str, np.ndarray], mesh: Any) -> dict[str, jax.Array]:
    """The global batch from this process's part of it (`sharding.process_batch_part`)."""

    def put(x: np.ndarray) -> jax.Array:
        x = np.asarray(x)
        global_shape = (x.shape[0] * _batch_part(mesh)[1], *x.shape[1:])
        return jax.make_array_from_process_local_data(
            sharding.batch_sharding(mesh, x.ndim), x, global_shape
        )

    return {k: put(v) for k, v in local.items()}


class _StepTrace:
    """Traces steps [first, first + count) of the loop with jax.profiler into `directory`."""

    def __init__(self, directory: str, first: int, count: int) -> None:
        self.directory, self.first, self.stop_at = directory, first, first + count
        self.active = False

    def before(self, step: int) -> None:
        if step == self.first and self.stop_at > self.first:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, state: Any, lead: bool) -> None:
        """Called with the number of steps done; ends the trace after the last traced one."""
        if self.active and step == self.stop_at:
            self.close(state)
            if lead:
                print(
                    f"\nprofile of steps {self.first + 1}-{self.stop_at} written to "
                    f"{self.directory} (tensorboard --logdir {self.directory}, xprof or Perfetto)",
                    flush=True,
                )

    def close(self, state: Any) -> None:
        if self.active:
            self.active = False
            try:
                jax.block_until_ready(state)
            except Exception:  # a failed step's state may be gone; its error surfaces elsewhere
                pass
            finally:  # the trace ends, even on KeyboardInterrupt
                jax.profiler.stop_trace()


class _Preempted(BaseException):
    """SIGTERM while a run sets up: nothing new to save. A BaseException (as
    KeyboardInterrupt), so that no `except Exception` on the way takes it for an error."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) stopped `train_and_evaluate`, after it saved a checkpoint (at the
    step reached; none while the run set up). A KeyboardInterrupt, so that a caller's own
    loop (a sweep, a notebook cell) stops as on any Ctrl-C; `metrics` are the last ones,
    as `train_and_evaluate` returns them ({} before the first step)."""

    def __init__(self, metrics: dict[str, float]):
        super().__init__("Ctrl-C")
        self.metrics = metrics


class _Preemption:
    """Turns SIGTERM and SIGINT (Ctrl-C) into a flag the loop checks; restores the old
    handlers on exit.

    Until `deferred()`, either stops a single-process run as soon as Python runs again
    (`_Preempted`, `Interrupted`): setting up (building a vocabulary, preparing a dataset,
    initialising the state) makes nothing to save, and a preempted machine's grace period
    may not outlast it. Several processes keep the default actions until then (one process
    returning while another waits in a collective would leave that one hanging). Afterwards
    it is a flag: the run saves a checkpoint at its next step, then returns (SIGTERM) or
    raises `Interrupted` (Ctrl-C). A second Ctrl-C raises KeyboardInterrupt at once, for a
    user who will not wait for the save. A SIGINT ignored from the start (a background job
    of a script) stays ignored.

    `exit_process`: stop by ending the process (status 0; Ctrl-C: by SIGINT) rather than by
    raising. An exception raised from the handler surfaces wherever Python runs next, e.g.
    midway through JAX's compilation, and the interpreter could then crash as it shut down;
    the application, which owns its process, has nothing to close before the first step.
    """

    def __init__(self, exit_process: bool = False) -> None:
        self.exit_process = exit_process
        self.requested = False
        self.signal_name: str | None = None  # of the first stop signal this process got
        self.immediate = True
        self.cleanup: Callable[[], None] | None = None  # before the process ends at once
        self._old: Any = None
        self._installed = False

    def __enter__(self) -> _Preemption:
        if jax.process_count() == 1:
            self._install()
        return self

    def _install(self) -> None:
        if self._installed:
            return
        signums = [s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN]
        try:
            old = {signum: signal.signal(signum, self._handle) for signum in signums}
        except ValueError:  # not the main thread: no handler
            return
        if self._old is None:  # the handlers from before this run, to restore on exit
            self._old = old
        self._installed = True

    def _handle(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: do not wait
        self.requested = True
        self.signal_name = self.signal_name or signal.Signals(signum).name
        if self.immediate and self.exit_process:
            if jax.process_index() == 0:
                print(setup_stopped(self.signal_name), flush=True)
            if self.cleanup is not None:
                self.cleanup()
            if signum == signal.SIGINT:
                end_by_sigint()
            sys.stderr.flush()
            os._exit(0)
        if self.immediate:
            raise Interrupted({}) if signum == signal.SIGINT else _Preempted

    def end(self, metrics: dict[str, float]) -> dict[str, float]:
        """`metrics`, to return after the run stopped on a signal; `Interrupted` for a Ctrl-C
        on any process (a collective when there are several: all raise, or none)."""
        if _any_process(self.signal_name == "SIGINT"):
            raise Interrupted(metrics)
        return metrics

    def deferred(self) -> None:
        self.immediate = False
        self.cleanup = None
        self._install()

    def __exit__(self, *exc: Any) -> None:
        self.immediate = False  # a signal now, as the run ends, raises nothing
        if self._installed and self._old is not None:
            for signum, handler in self._old.items():
                signal.signal(signum, handler)
        self._installed = False

    def agreed(self) -> bool:
        """True when any process got a stop signal (a collective when there are several)."""
        return _any_process(self.requested)

    def stopped_by(self) -> str:
        """The stop signal's name, as this process knows it."""
        return self.signal_name or "a stop signal on another process"


def _any_process(flag: bool) -> bool:
    """Whether `flag` holds on any process (a collective when there are several)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.array([flag]))))


CHANGES_FILE = "config_changes.jsonl"
# Keys a resumed run keeps: they decide which examples come next (the data position is
# saved in batches of this stream) and where the parameters started.
_RUN_IDENTITY = ("dataset", "train_split", "seed", "batch_size")
_OPTIMIZER_PROBE = {"kernel": np.zeros((2, 2), np.float32), "bias": np.zeros((2,), np.float32)}


def _json_items(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """{dotted key: value} of a config, `model` too, values as its JSON has them."""
    return _flat(json.loads(config.to_json_best_effort()), into_model=True)


def _unversioned(dataset: Any) -> Any:
    """A dataset name without the version it may name ("mnist:3.0.1" -> "mnist")."""
    return dataset.partition(":")[0] if isinstance(dataset, str) else dataset


def _optimizer_layout(config: ml_collections.ConfigDict) -> Any:
    try:
        return jax.tree.structure(jax.eval_shape(_make_optimizer(config).init, _OPTIMIZER_PROBE))
    except Exception:  # noqa: BLE001 - a record this version cannot build: nothing to compare
        return None


# Keys whose change leaves a step's logged evaluation as this config would compute it: how
# the run goes on, not what or how it evaluates.
_EVAL_NEUTRAL = {
    "total_steps",
    "log_every",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "progress_bar",
    "profile_steps",
    "profile_skip_steps",
    "compilation_cache_dir",
    "data_threads",
    "prefetch",
    "step_rng",
    "sharding_rules",
}


def _keeps_evaluation(key: str) -> bool:
    return key in _EVAL_NEUTRAL or key.startswith(("optimizer.", "mesh.", "sample_"))


def _relayouts(
    theirs: ml_collections.ConfigDict, layout: Any, changes: dict[str, tuple[Any, Any]]
) -> dict[str, tuple[Any, Any]]:
    """Of the optimizer keys in `changes`, those that alone change the optimizer state's
    layout of the run `theirs` (`layout`); all of them where no one alone does."""
    keys = {k: v for k, v in changes.items() if k.startswith("optimizer.")}
    culprits = {}
    for key, (_, value) in keys.items():
        changed = ml_collections.ConfigDict(theirs.to_dict())
        try:
            changed.optimizer[key.removeprefix("optimizer.")] = value
        except (KeyError, TypeError, AttributeError):  # a key that one of them lacks
            culprits[key] = keys[key]
            continue
        alone = _optimizer_layout(changed)
        if alone is not None and alone != layout:
            culprits[key] = keys[key]
    return culprits or keys


def _described(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changes.items())


# Keys whose None means "the optimizer's usual value" (jaxmodels.optim.DEFAULT_MOMENTUM,
# DEFAULT_EPS), which versions before that recorded as numbers (0.9, 1e-8) in config.json.
_RUN_DEFAULTS = ("momentum", "eps")


def with_run_defaults(
    config: ml_collections.ConfigDict, theirs: ml_collections.ConfigDict | None
) -> ml_collections.ConfigDict:
    """`config`, or a copy where keys of `_RUN_DEFAULTS` it leaves None take the value the
    resumed run recorded (`theirs`: `tasks.resumed_config`, None for a new run): it goes on
    as it started (an RMSprop run with momentum 0.9, a LAMB run with eps 1e-8), whatever
    the usual value is now."""
    if theirs is None:
        return config
    kept = {
        k: theirs.optimizer[k]
        for k in _RUN_DEFAULTS
        if config.optimizer[k] is None and theirs.get("optimizer", {}).get(k) is not None
    }
    if not kept:
        return config
    config = config.copy_and_resolve_references()
    for k, v in kept.items():
        config.optimizer[k] = float(v)
    return config


def resume_changes(
    config: ml_collections.ConfigDict, theirs: ml_collections.ConfigDict | None, workdir: str
) -> dict[str, tuple[Any, Any]]:
    """What `config` changes of the run whose checkpoints `workdir` holds (`theirs`: its
    `config.json`, how it started, from `tasks.resumed_config`): {dotted key: (then, now)};
    {} for a new run (`theirs` None).

    Raises:
      ConfigError: for a change the checkpoints cannot follow: another task or model
        (`model.name`); another dataset, train split, seed or batch size (the saved data
        position counts batches of that stream); an optimizer whose state is laid out
        otherwise (another optimizer, clipping, weight decay or accumulation switched on or
        off; the keys that do it are named) or counts otherwise (another
        accumulate_steps).
    """
    if theirs is None:
        return {}
    if theirs.get("task") != config.task:
        raise ConfigError(
            f"--workdir {workdir} holds the checkpoints of a run of another task "
            f"({theirs.get('task')!r}; this config's: {config.task!r}); use another --workdir"
        )
    then, now = _json_items(theirs), _json_items(config)
    changes = {k: (then.get(k), now.get(k)) for k in sorted(set(then) | set(now))}
    changes = {k: v for k, v in changes.items() if v[0] != v[1]}
    if "model.name" in changes and then.get("model.name") is not None:
        raise ConfigError(
            f"--workdir {workdir} holds the checkpoints of another model "
            f"({then['model.name']!r}; this config's: {now.get('model.name')!r}); use another "
            "--workdir"
        )
    for key in _RUN_IDENTITY:
        if key == "dataset" and _unversioned(then.get(key)) == _unversioned(now.get(key)):
            continue  # the version named or not: the checkpoints' record of it decides
        if key in changes and key in then:
            raise ConfigError(
                f"config key {key}: the run in --workdir {workdir} started with "
                f"{then[key]!r}, this config has {now.get(key)!r}; a resumed run keeps its "
                f"data stream and starting point: pass --config.{key}={then[key]} or use "
                "another --workdir"
            )
    before, after = _optimizer_layout(theirs), _optimizer_layout(config)
    if before is not None and after is not None and before != after:
        named = _described(_relayouts(theirs, before, changes))
        raise ConfigError(
            f"the run in --workdir {workdir} has an optimizer state of another layout than "
            f"this config's ({named or 'the optimizer'}): the checkpoints cannot be resumed "
            "with it; restore those keys, or use another --workdir"
        )
    key = "optimizer.accumulate_steps"
    if key in changes and then.get(key) is not None:
        raise ConfigError(
            f"config key {key}: the run in --workdir {workdir} started with {then[key]}, this "
            f"config has {now.get(key)}; its optimizer state counts updates of {then[key]} "
            f"steps (the schedule's position, Adam's bias correction): pass "
            f"--config.{key}={then[key]} or use another --workdir"
        )
    return changes


def _restore(ckpt: checkpoint.Checkpointer, state: Any) -> tuple[Any, dict[str, Any]]:
    """`ckpt.restore(state)`; a checkpoint of a run that accumulated gradients with an
    earlier version (`optax.MultiSteps`' state) is restored in that layout and converted."""
    try:
        return ckpt.restore(state)
    except CheckpointError:
        if not isinstance(state.opt_state, optim.AccumulationState):
            raise
        legacy = state.replace(opt_state=optim.as_multisteps(state.opt_state))
        try:
            old, data_state = ckpt.restore(legacy)
        except CheckpointError:
            pass
        else:
            return old.replace(opt_state=optim.from_multisteps(old.opt_state)), data_state
        raise


def stopped_at(workdir: str, total_steps: int) -> int | None:
    """The step a run in `workdir` stopped at short of its end, where the same command goes
    on: its latest checkpoint is before `total_steps`, or that step's evaluation (which
    runs after the checkpoint is saved) was not logged (SIGTERM at the last step). None for
    a finished run, or one with no checkpoint."""
    directory = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(directory):
        return None
    ckpt = checkpoint.Checkpointer(directory, async_save=False, create=False)
    try:
        latest = ckpt.latest_step()
        if latest is None or latest < total_steps:
            return latest
        if not ckpt.restore_data().get("eval_pending"):
            return None
    finally:
        ckpt.close()
    return latest if logged_eval(os.path.join(workdir, "metrics.jsonl"), latest) is None else None


def _check_datasets(
    data_state: dict[str, Any],
    task: tasks.Task,
    ckpt: checkpoint.Checkpointer,
    changes: dict[str, tuple[Any, Any]],
) -> None:
    """The data a checkpoint was trained on (its TFDS datasets' versions) must be the data
    this run reads, on every process: the saved position counts batches of that data, the
    logged evaluations were of it. Checkpoints of earlier versions of this library do not
    say; for them a dataset named with another version is refused, as any other dataset."""
    saved = data_state.get("datasets")
    if saved is None:
        if "dataset" in changes:  # another version named (`resume_changes` let it by)
            then, now = changes["dataset"]
            ckpt.close()
            raise ConfigError(
                f"config key dataset: the run's checkpoints in {ckpt.directory} were trained "
                f"on {then!r} and do not record its version, this config has {now!r}: pass "
                f"--config.dataset={then} or use another --workdir"
            )
        return
    differs = list(saved) != list(task.datasets)
    if not _any_process(differs):
        return
    ckpt.close()
    reads = ", ".join(task.datasets) or "generated data"
    other = (
        f"this run would read {reads}, another version"
        if differs
        else "another process of this run reads another version"
    )
    raise DataError(
        f"the checkpoints in {ckpt.directory} were trained on "
        f"{', '.join(saved) or 'generated data'}, and {other}. Resume where the run's "
        "version is prepared (naming it, e.g. "
        f"dataset='{_pinned(saved[0]) if saved else 'NAME:VERSION'}'; an embedded dataset "
        "comes in this library's version only), or use another --workdir"
    )


def _pinned(full_name: str) -> str:
    """TFDS's "name/config/1.2.0" as a dataset name that pins it: "name/config:1.2.0"."""
    base, _, version = full_name.rpartition("/")
    return f"{base}:{version}"


def _logged_eval(writer: MetricWriter, step: int) -> dict[str, float] | None:
    """`writer.eval_metrics(step)`, None where the file cannot be read as written (the
    other processes wait for this one's answer)."""
    try:
        return writer.eval_metrics(step)
    except (OSError, ValueError, TypeError):
        return None


def _from_lead(value: Any) -> Any:
    """Process 0's `value` (JSON-able) on every process (a collective when there are
    several)."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    size = int(multihost_utils.broadcast_one_to_all(np.int32(data.size)))
    sent = multihost_utils.broadcast_one_to_all(np.resize(data, size))  # process 0's bytes
    return json.loads(bytes(np.asarray(sent)))


def evaluate(task: tasks.Task, eval_step: Any, state: Any, mesh: Any) -> dict[str, float]:
    """One pass over the eval split; returns `eval/<metric>` means."""
    assert task.eval_iterator is not None
    totals: dict[str, Any] = {}
    for local in task.eval_iterator():
        sums = eval_step(state, _global_batch(local, mesh))
        totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
    totals = {k: float(v) for k, v in jax.device_get(totals).items()}
    # Each metric is a sum; it is divided by its own `<name>_count` if the task gives one
    # (e.g. masked tokens for an MLM accuracy), else by `count` (examples).
    count = max(totals.pop("count"), 1.0)
    counts = {k: totals.pop(k) for k in [k for k in totals if k.endswith("_count")]}
    return {f"eval/{k}": v / max(counts.get(f"{k}_count", count), 1.0) for k, v in totals.items()}


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, exit_on_early_sigterm: bool = False
) -> dict[str, float]:
    """Trains `config` in `workdir`, resuming from its latest checkpoint if any.

    Returns the last evaluation's metrics (or the last train metrics without an eval set).
    A SIGTERM before the first step returns {} at once (nothing to save); later, it saves
    a checkpoint at the next step and returns. Ctrl-C does the same but raises
    `Interrupted` (a KeyboardInterrupt holding the metrics) instead of returning. With
    `exit_on_early_sigterm` (the application's own process), either ends the process before
    the first step (status 0; Ctrl-C: by SIGINT).

    Raises:
      Interrupted: Ctrl-C, after saving.
      UserError: a config, dataset or workdir that cannot be used (nothing saved is lost).
    """
    with _Preemption(exit_on_early_sigterm) as preempt:
        try:
            validate_config(config)
            new = not os.path.exists(os.path.abspath(workdir))
            workdir = prepare_workdir(workdir)
            with workdir_lock(workdir):
                # A workdir this start made and leaves holding nothing of the run is removed
                # (while locked, so never another run's).
                unused = functools.partial(_remove_if_unused, workdir) if new else None
                preempt.cleanup = unused
                try:
                    with compilation_cache(config.compilation_cache_dir, workdir) as cache_dir:
                        return _train(config, workdir, cache_dir, preempt)
                except (UserError, _Preempted, KeyboardInterrupt):
                    if unused is not None:
                        unused()
                    raise
        except _Preempted:
            if jax.process_index() == 0:
                print(setup_stopped(preempt.stopped_by()), flush=True)
            return {}


def _free_name(path: str) -> str:
    """`path`, or `path-2`, `path-3`, ... : the first that does not exist."""
    found, n = path, 1
    while os.path.exists(found):
        n += 1
        found = f"{path}-{n}"
    return found


def _set_aside_earlier_start(workdir: str) -> None:
    """Moves the logs of a start without checkpoints (killed before its first, or whose
    checkpoints were deleted) into previous/<time>/ before this start, which begins at step
    0, writes its own: they were overwritten, the metrics of a whole run among them (and
    TensorBoard would show both starts' event files as one run)."""
    try:
        with open(os.path.join(workdir, logs.METRICS_FILE), encoding="utf-8") as f:
            if not any(line.strip() for line in f):
                return
    except FileNotFoundError:
        return
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    folder = _free_name(os.path.join(workdir, "previous", stamp))
    os.makedirs(folder)
    for name in (logs.METRICS_FILE, tasks.CONFIG_FILE, CHANGES_FILE, logs.TENSORBOARD_DIR):
        if os.path.exists(os.path.join(workdir, name)):
            os.replace(os.path.join(workdir, name), os.path.join(folder, name))
    print(
        f"starting at step 0 in a workdir without checkpoints: the logs there (of a start "
        f"that made none, or whose checkpoints were deleted) are kept in {folder}",
        flush=True,
    )


def _unchecked_resume(workdir: str) -> str | None:
    """Says that a run resumed without its record (`config.json` missing or unreadable)
    cannot be checked against it; returns the name to keep an unreadable record under when
    this start writes its own (None: nothing to keep)."""
    path = os.path.join(workdir, tasks.CONFIG_FILE)
    reason, aside, kept = f"{path} is missing", None, ""
    if os.path.exists(path):
        aside = _free_name(path + ".unreadable")
        reason = f"{path} cannot be read"
        kept = f"; the unreadable file is kept as {os.path.basename(aside)}"
    print(
        f"warning: resuming without the run's record: {reason}. Whether this config "
        "continues that run (seed, batch_size, dataset, model, optimizer) cannot be checked; "
        f"the checkpoints' own checks still apply{kept}",
        file=sys.stderr,
        flush=True,
    )
    return aside


def _raised_at(error: BaseException) -> str:
    """Where `error` was raised: its traceback's innermost frame, as path:line (relative to
    this project where it is in it)."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "?"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.abspath(frames[-1].filename)
    shown = os.path.relpath(path, root) if path.startswith(root + os.sep) else path
    return f"{shown}:{frames[-1].lineno}"


def _train(
    config: ml_collections.ConfigDict, workdir: str, cache_dir: str | None, preempt: _Preemption
) -> dict[str, float]:
    """`train_and_evaluate` in a checked config, a ready workdir and its compilation cache."""
    lead = jax.process_index() == 0
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = sharding.logical_rules(config.sharding_rules)
    sharding.check_rules_use_mesh(mesh, config.sharding_rules)
    _check_batch(config, mesh)
    theirs = tasks.resumed_config(workdir)  # None for a new run
    unreadable_aside = None
    if theirs is None and tasks.resuming(workdir) and lead:
        unreadable_aside = _unchecked_resume(workdir)
    config = with_run_defaults(config, theirs)
    changes = resume_changes(config, theirs, workdir)

    # Each process loads its part of every batch: usually one part per process; processes
    # that differ only along `tensor` hold the same rows and load the same part.
    try:
        task = tasks.build(config, *_batch_part(mesh), workdir)
        tx = _make_optimizer(config)
        state, shardings = training.create_train_state(
            task.model, tx, task.example_inputs, jax.random.PRNGKey(config.seed), mesh, rules
        )
    except UserError:
        raise
    except (ValueError, TypeError, ZeroDivisionError, IndexError) as e:
        # A model or data setting out of range fails in the model's (or the pipeline's)
        # first use: a ConfigError here, with that error, before the workdir changes.
        raise ConfigError(
            f"this config cannot build its model and data: {brief(e)} (raised at "
            f"{_raised_at(e)}; most likely a model.* or data setting out of range)"
        ) from e
    empty = [name for name, x in leaves_by_name(state.params).items() if x.size == 0]
    if empty:  # (were found by the first checkpoint, which cannot save them)
        raise ConfigError(
            f"this config makes parameters of size 0 ({', '.join(empty[:4])}): a model.* size of 0?"
        )
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    preempt.deferred()  # from here on, resources to close: the loop's checks see a stop signal
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints
    )
    train_iter = task.train_iterator()
    start, eval_pending = 0, False
    latest = ckpt.latest_step()
    if latest is not None and latest > config.total_steps:
        ckpt.close()
        raise ConfigError(
            f"the latest checkpoint in {ckpt.directory} is step {latest}, past total_steps="
            f"{config.total_steps}; raise total_steps to continue, or use another --workdir"
        )
    if latest is not None:
        try:
            state, data_state = _restore(ckpt, state)
        except CheckpointError as e:
            ckpt.close()
            if not changes or not isinstance(e, CheckpointMismatchError):
                raise  # (a checkpoint that cannot be read: the config is not why)
            raise CheckpointError(
                f"{e}\nThis config differs from the one in {tasks.CONFIG_FILE} that the run "
                f"started with: {_described(changes)}"
            ) from e
        _check_datasets(data_state, task, ckpt, changes)
        train_iter.set_state(data_state["iterator"])
        start = int(state.step)
        # Saved before its step's evaluation ran (or was preempted): run it on resuming.
        eval_pending = bool(data_state.get("eval_pending", False))
    elif task.init_params is not None:  # e.g. fine-tuning: the pretrained weights
        params = task.init_params(jax.device_get(state.params))
        state = state.replace(params=jax.device_put(params, shardings.params))
    # The stored learning rate (the one logged) is this config's schedule's at the state's
    # count: a run resumed with another schedule logged the old one's first. A small program,
    # run on every start so that a resumed run finds it in the compilation cache.
    schedule = optim.make_schedule(**_schedule_args(config))
    refresh = functools.partial(optim.with_schedule, schedule=schedule)
    state = state.replace(opt_state=jax.jit(refresh, donate_argnums=0)(state.opt_state))
    if lead:
        if not start:
            _set_aside_earlier_start(workdir)
        if changes and start:
            # config.json becomes this config; what it changed, and from which step, is kept.
            record = {"step": start, "changes": {k: list(v) for k, v in changes.items()}}
            with open(os.path.join(workdir, CHANGES_FILE), "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            print(f"resuming with a changed config (kept in {CHANGES_FILE}): {_described(changes)}")
        if unreadable_aside and os.path.exists(os.path.join(workdir, tasks.CONFIG_FILE)):
            os.replace(os.path.join(workdir, tasks.CONFIG_FILE), unreadable_aside)
        tasks.write_text_atomically(
            os.path.join(workdir, tasks.CONFIG_FILE), config.to_json_best_effort(indent=2)
        )
        print(
            f"{'resuming at step ' + str(start) if start else 'starting'}: "
            f"{type(task.model).__name__} ({n_params:,} params), "
            f"{json.dumps(task.info)}, mesh {dict(mesh.shape)}, rules {config.sharding_rules}, "
            f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
            f"{jax.process_count()} process(es), compilation cache {cache_dir or 'off'}",
            flush=True,
        )

    train_step = training.compile_train_step(task.loss_fn, shardings, mesh, rules, config.step_rng)
    eval_step = training.compile_eval_step(task.eval_fn, shardings, mesh, rules)
    writer = MetricWriter(workdir, enabled=lead)
    writer.drop_after(start)  # rows of steps this run will take again
    bar = None
    if lead and config.progress_bar:
        from tqdm import tqdm

        bar = tqdm(
            total=config.total_steps,
            initial=start,
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0,
        )

    pending: list[tuple[int, dict[str, jax.Array]]] = []
    last_time, last_step = time.perf_counter(), start
    result: dict[str, float] = {}

    def flush(step: int) -> None:
        """Waits for the pending steps' metrics, checks them, writes their mean."""
        nonlocal last_time, last_step, result
        if not pending:
            return
        values = jax.device_get([m for _, m in pending])
        for (s, _), m in zip(pending, values, strict=True):
            if not np.isfinite(m["loss"]):
                bad = training.first_non_finite(state.params)
                where = f"; first non-finite parameter after it: {bad}" if bad else ""
                stop(f"non-finite loss ({m['loss']}) at step {s + 1}{where}")
        now = time.perf_counter()
        mean = {f"train/{k}": float(np.mean([m[k] for m in values])) for k in values[0]}
        mean["train/steps_per_sec"] = (step - last_step) / max(now - last_time, 1e-9)
        last_time, last_step = now, step
        pending.clear()
        writer.write(step, mean)
        result = mean
        if bar is not None:
            bar.set_postfix(
                loss=f"{mean['train/loss']:.4f}", steps_s=f"{mean['train/steps_per_sec']:.1f}"
            )

    def run_eval(step: int, resumed: bool = False) -> None:
        nonlocal result, last_time
        result = evaluate(task, eval_step, state, mesh)
        # On resuming, a row logged with other settings may be there: this one replaces it.
        if resumed:
            writer.replace_eval(step, result)
        else:
            writer.write(step, result)
        show(step, result)
        last_time = time.perf_counter()  # train/steps_per_sec times training steps only

    def show(step: int, metrics: dict[str, float], note: str = "") -> None:
        if lead:
            text = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            (bar.write if bar is not None else print)(f"step {step}: {text}{note}")

    def stop(what: str) -> None:
        try:
            kept = ckpt.latest_step()  # a save in flight of a good state counts
        except Exception:  # that save failed: its error comes when the run closes
            kept = ckpt.latest_step(wait=False)
        where = (
            f"Stopped; the last good checkpoint is step {kept} in {ckpt.directory}."
            if kept is not None
            else "Stopped before any checkpoint."
        )
        raise NonFiniteError(
            f"{what}. {where} Lower the learning rate (a resumed run takes the new one) or "
            "check the data; gradient clipping (optimizer.grad_clip_norm) changes the "
            "optimizer's state, so it needs a run started with it (another --workdir)."
        )

    def save(step: int, eval_pending: bool) -> None:
        # A finite loss is computed before the step's update: the state itself is checked,
        # so that no checkpoint (which would replace good ones) holds NaN or inf.
        ckpt.wait()
        bad = training.first_non_finite(
            {"params": state.params, "model_state": state.model_state, "opt_state": state.opt_state}
        )
        if bad:
            stop(f"the state after step {step} is not finite (first: {bad}); not saved")
        data_state = {
            "iterator": train_iter.get_state(),
            "eval_pending": eval_pending,
            "datasets": list(task.datasets),
        }
        ckpt.save(step, state, data_state)

    trace = _StepTrace(
        os.path.join(workdir, "profile"), start + config.profile_skip_steps, config.profile_steps
    )
    if lead and config.profile_steps and trace.stop_at > config.total_steps:
        print(
            f"note: the profile's steps {trace.first + 1}-{trace.stop_at} (profile_skip_steps="
            f"{config.profile_skip_steps} after step {start}) reach past total_steps="
            f"{config.total_steps}: "
            + ("no trace is taken" if trace.first >= config.total_steps else "it is cut short")
            + "; lower profile_skip_steps",
            flush=True,
        )
    try:
        if preempt.agreed():  # during the restore or the setup after it
            if lead:
                print(setup_stopped(preempt.stopped_by()), flush=True)
            return preempt.end(result)
        if eval_pending and task.eval_iterator is not None:
            # The checkpoint was saved before its step's evaluation, which the run may have
            # logged before it stopped (e.g. a finished run, extended): those are the metrics
            # of this very state, so they are not computed again.
            keeps = all(_keeps_evaluation(k) for k in changes)
            logged = _from_lead(_logged_eval(writer, start) if lead and keeps else None)
            if logged is None:
                run_eval(start, resumed=True)
            else:
                result = logged
                show(start, result, f" (logged before the restart, in {writer.path})")
        step = start
        while step < config.total_steps:
            batch = _global_batch(next(train_iter), mesh)
            trace.before(step)
            with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
                state, metrics = train_step(state, batch)
            pending.append((step, metrics))
            step += 1
            trace.after(step, state, lead)
            if bar is not None:
                bar.update(1)
            last = step == config.total_steps
            do_eval = task.eval_iterator is not None and (
                last or (config.eval_every and step % config.eval_every == 0)
            )
            do_ckpt = last or (config.checkpoint_every and step % config.checkpoint_every == 0)
            at_flush = step % config.log_every == 0 or do_eval or do_ckpt or last
            # One process can stop at any step; several must agree, at log points.
            if at_flush or (preempt.requested and jax.process_count() == 1):
                flush(step)
                if preempt.agreed():
                    save(step, do_eval)
                    ckpt.wait()
                    if lead:
                        print(f"\n{preempt.stopped_by()}: saved step {step}; exiting.", flush=True)
                    return preempt.end(result)
            if do_ckpt:
                save(step, do_eval)
            if do_eval:
                run_eval(step)
        if start == config.total_steps and task.eval_iterator is not None and not eval_pending:
            result = evaluate(task, eval_step, state, mesh)  # a finished run's last metrics
        if preempt.agreed():  # a signal in the last evaluation: all saved, but a Ctrl-C stops
            return preempt.end(result)
    finally:
        trace.close(state)
        if bar is not None:
            bar.close()
        ckpt.wait()
        ckpt.close()
        writer.close()
    return result
