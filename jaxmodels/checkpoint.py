"""Checkpoints: Orbax, behind one small class.

* Asynchronous saves (the train loop goes on while the arrays are written).
* Atomic: Orbax writes a step to a temporary folder and renames it when complete, so an
  interrupted save never replaces a good checkpoint and `latest_step` only sees complete ones.
* Keep the last K.
* Restore onto any mesh: the target shardings decide where each array lands.
* The data iterator's position (a small JSON dict) is saved with the state, so a resumed
  run sees exactly the batches it would have seen.
* A checkpoint from a different model fails with the list of mismatched tensors.

Example:
  >>> ckpt = Checkpointer("/tmp/run/checkpoints", max_to_keep=2)  # doctest: +SKIP
  >>> ckpt.save(100, state, data_state={"next_index": 100})        # doctest: +SKIP
  >>> state, data_state = ckpt.restore(abstract_state)             # doctest: +SKIP
"""

from __future__ import annotations

import json
import operator
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxmodels.errors import CheckpointError, CheckpointMismatchError, brief, leaves_by_name


def _stored_shape(x: Any) -> tuple[int, ...]:
    """The shape a leaf has on disk: a typed PRNG key (`jax.random.key`) is stored as its
    key data (e.g. uint32[..., 2])."""
    if _is_key(x):
        abstract = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return tuple(jax.eval_shape(jax.random.key_data, abstract).shape)
    return tuple(x.shape)


def _is_key(x: Any) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _kind_of(restored: Any, wanted: Any) -> Any:
    """`restored` as the kind of PRNG key `wanted` is: Orbax gives back a key as it was
    saved, a typed key (`jax.random.key`) or its raw data (`jax.random.PRNGKey`), whatever
    the target's."""
    if not hasattr(restored, "dtype") or _is_key(restored) == _is_key(wanted):
        return restored
    if _is_key(restored):
        return jax.random.key_data(restored)
    impl = jax.random.key_impl(wanted) if isinstance(wanted, jax.Array) else wanted.dtype._impl
    return jax.random.wrap_key_data(restored, impl=impl)


def _as_step(step: Any) -> int:
    """`step` as an int: a checkpoint's step is a non-negative integer (a NumPy or JAX
    integer scalar too, e.g. `state.step`); a string or float is refused (saved, "40" or
    40.0 made a folder no one lists)."""
    try:
        value = None if isinstance(step, bool) else operator.index(step)
    except TypeError:
        value = None
    if value is None or value < 0:
        raise ValueError(
            f"a checkpoint step is a non-negative integer, got {step!r} ({type(step).__name__})"
        )
    return value


def _host_array(metadata: Any) -> jax.ShapeDtypeStruct:
    """The restore target of a leaf that Orbax's metadata describes (read as numpy)."""
    return jax.ShapeDtypeStruct(metadata.shape, metadata.dtype)


def _empty(x: Any) -> bool:
    """A tree node without arrays: None, or a container of no leaves (an optax
    `EmptyState`, an empty dict or FrozenDict; Orbax's metadata has None or {} for it)."""
    return x is None or (
        not hasattr(x, "shape") and jax.tree_util.tree_structure(x).num_leaves == 0
    )


class Checkpointer:
    """Saves and restores a train state plus a JSON data-iterator state.

    Reads (`restore`, `restore_data`, `restore_params`, `latest_step`, `all_steps`) first
    wait for the saves in flight, as `wait()` does: a background save that failed raises its
    error there, and the steps listed are those on disk once it is done (keep-last-K may have
    removed older ones).

    Args:
      directory: where step folders go (created if missing).
      max_to_keep: keep the newest K >= 1 complete checkpoints; None: all.
      async_save: write in a background thread.
      create: create `directory` if missing; False: read a directory that exists.

    Raises:
      ValueError: max_to_keep < 1 (0 deleted each checkpoint as soon as it was written).
      CheckpointError: a directory that cannot be created.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_to_keep: int | None = 3,
        async_save: bool = True,
        create: bool = True,
    ):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(
                f"max_to_keep={max_to_keep} would delete every checkpoint as it is written: "
                "keep at least 1 (None: all)"
            )
        self.directory = os.path.abspath(os.fspath(directory))
        self._closed = False
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise CheckpointError(
                f"checkpoint directory {self.directory} is a file; choose a folder (a new "
                "one is created), e.g. another --workdir"
            )
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=create,
            # Each save makes its step's folder before it returns, so a folder that cannot be
            # made fails that call. Made in the background, its failure left Orbax's other
            # threads of that save waiting for their signal (20 minutes) at the process's end.
            async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        )
        try:
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                item_handlers={
                    "state": ocp.StandardCheckpointHandler(),
                    "data": ocp.JsonCheckpointHandler(),
                },
            )
        except OSError as e:
            raise CheckpointError(
                f"cannot create checkpoint directory {self.directory}: {e}. "
                "Choose a writable --workdir."
            ) from e
        # Refused here rather than by the first save, after the first steps' work.
        if create and not os.access(self.directory, os.W_OK | os.X_OK):
            self._manager.close()
            raise CheckpointError(
                f"cannot write checkpoints in {self.directory} (not writable by this "
                "process, or on a read-only file system); choose a writable --workdir, or "
                "make that folder writable (to only read its checkpoints: create=False)"
            )

    def latest_step(self, *, wait: bool = True) -> int | None:
        """The newest complete checkpoint's step, or None (`wait`: as `all_steps`)."""
        steps = self.all_steps(wait=wait)
        return max(steps) if steps else None

    def all_steps(self, *, wait: bool = True) -> list[int]:
        """The steps of the complete checkpoints, oldest first, once the saves in flight are
        done; `wait=False`: those complete now, without waiting (nor raising the error of a
        background save that failed)."""
        if wait and not self._closed:
            self.wait()
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_state: dict[str, Any] | None = None) -> bool:
        """Starts saving `state` (and `data_state`, plain JSON) as `step`; returns at once if
        async.

        The data state comes back as JSON has it: tuples as lists, keys as strings.

        Raises:
          TypeError: a data state that is not a dict of plain JSON (saved, it could not be
            restored).
          RuntimeError: after `close()`.
          CheckpointError: an earlier save failed in the background (as `wait` says it:
            each save first waits for the one before); `step` is saved already (a checkpoint
            is never overwritten), or is before the latest checkpoint here; this save cannot
            write (the folder turned read-only, say). A failure of this save's background
            writing comes from the next `wait` or `save`.
          ValueError: `step` is not a non-negative integer.
        """
        if self._closed:
            raise RuntimeError(
                f"this Checkpointer of {self.directory} is closed: save with a new one"
            )
        step = _as_step(step)
        # Orbax's save waits for the save before it too, and would raise its failure as this
        # step's (its raw error, or an OSError read as this save's own below).
        self.wait()
        saved = self._manager.all_steps()  # those on disk when it started, and its saves since
        if saved and step < max(saved):
            # Keep-last-K keeps the newest saves, whatever their steps: it would delete a
            # later step's checkpoint, and the latest would no longer be this run's last.
            raise CheckpointError(
                f"step {step} is before the latest checkpoint in {self.directory} (step "
                f"{max(saved)}): save later steps, or into another directory (or delete the "
                "later steps' folders first)"
            )
        if data_state is not None and not isinstance(data_state, dict):
            raise TypeError(
                f"data_state must be a dict (a JSON object), got {type(data_state).__name__}"
            )
        try:  # here, not in the background save, which would lose the whole checkpoint
            json.dumps(data_state or {})
        except (TypeError, ValueError) as e:
            raise TypeError(
                f"data_state must be plain JSON (dicts, lists, str, int, float, bool, None): "
                f"{e}; convert NumPy values first, e.g. int(x) or float(x)"
            ) from None
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state or {}),
        )
        try:
            return self._manager.save(step, args=args, force=True)
        except getattr(ocp.checkpoint_manager, "StepAlreadyExistsError", ()) as e:
            raise CheckpointError(
                f"step {step} is saved already in {self.directory} ({e}): a checkpoint is "
                "never overwritten; save another step, or delete that step's folder first"
            ) from None
        except OSError as e:  # e.g. its folder could not be made (read-only now, gone, full)
            raise CheckpointError(
                f"saving step {step} in {self.directory} failed: {brief(e)}. Check that the "
                "folder is writable and has space, or save elsewhere (the training "
                "application resumes from the latest complete checkpoint)"
            ) from e

    def wait(self) -> None:
        """Blocks until every pending save is on disk.

        Raises:
          CheckpointError: a background save failed (e.g. the disk is full); the complete
            checkpoints before it are kept.
        """
        try:
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - any failure of the save, with its folder
            if "No space left on device" in str(e):  # (TensorStore's says so pages in)
                raise CheckpointError(
                    f"saving a checkpoint in {self.directory} failed: no space left on the "
                    "device. The complete checkpoints there are kept: free some space, or "
                    "save elsewhere (the training application resumes from the latest)"
                ) from e
            raise CheckpointError(
                f"saving a checkpoint in {self.directory} failed ({brief(e)}); the complete "
                "checkpoints there are kept (the training application resumes from the latest)"
            ) from e

    def close(self) -> None:
        self._closed = True
        self._manager.close()

    def _check_compatible(self, step: int, target: Any) -> None:
        path = os.path.join(self.directory, str(step))
        try:
            meta = self._manager.item_metadata(step)["state"]
        except Exception as e:  # noqa: BLE001 - any failure here means unreadable
            raise CheckpointError(
                f"checkpoint {path} is unreadable ({brief(e)}). Delete that folder to "
                "resume from the previous checkpoint, or use a new --workdir."
            ) from e
        if meta is None:
            raise CheckpointError(
                f"checkpoint {path} has no readable state metadata (partial write?). Delete "
                "that folder to resume from the previous checkpoint, or use a new --workdir."
            )
        theirs = {k: tuple(v.shape) for k, v in leaves_by_name(meta).items() if hasattr(v, "shape")}
        ours = {k: _stored_shape(x) for k, x in leaves_by_name(target).items()}

        def order(key: str) -> tuple[int, str]:  # parameters first: the informative part
            return (0 if key.startswith("params") else 1, key)

        missing = sorted(set(ours) - set(theirs), key=order)
        unexpected = sorted(set(theirs) - set(ours), key=order)
        shapes = sorted(
            f"{k}: checkpoint {theirs[k]} vs model {ours[k]}"
            for k in set(ours) & set(theirs)
            if theirs[k] != ours[k]
        )
        shapes.sort(key=order)
        # Nodes without arrays (optax's empty states) are part of the tree too: adam's and
        # adamw's hold the same arrays in trees of another structure.
        theirs_empty, ours_empty = (
            {k for k, v in leaves_by_name(tree, is_leaf=_empty).items() if _empty(v)}
            for tree in (meta, target)
        )
        empty_only = [sorted(theirs_empty - ours_empty), sorted(ours_empty - theirs_empty)]
        if missing or unexpected or shapes or any(empty_only):
            lines = [f"checkpoint {path} was written by a different model or optimizer:"]
            for title, items in (
                ("missing in checkpoint", missing),
                ("not in this model", unexpected),
                ("shape mismatch", shapes),
                ("empty (stateless) nodes only in checkpoint", empty_only[0]),
                ("empty (stateless) nodes only in this state", empty_only[1]),
            ):
                if items:
                    shown = ", ".join(items[:8]) + (" ..." if len(items) > 8 else "")
                    lines.append(f"  {title} ({len(items)}): {shown}")
            lines.append("Use the config that wrote it, or a new --workdir to start a fresh run.")
            raise CheckpointMismatchError("\n".join(lines))

    def _step(self, step: int | None) -> int:
        """`step` (default: the latest) if this directory holds it complete, after the saves
        in flight (the latest is then the step last saved, not the one before it)."""
        step = None if step is None else _as_step(step)
        steps = self.all_steps()
        if step is None and steps:
            step = max(steps)
        if step is None:
            raise CheckpointError(f"no complete checkpoint in {self.directory}")
        if step not in steps:
            raise CheckpointError(
                f"no complete checkpoint of step {step} in {self.directory}; its steps: "
                f"{sorted(steps)}"
            )
        return step

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores onto the shapes, dtypes and shardings of `target`.

        Args:
          target: a pytree like the saved state whose leaves are arrays or
            `jax.ShapeDtypeStruct`s with `.sharding` (the mesh may differ from the one
            that saved).
          step: which checkpoint; default the latest complete one.

        Returns:
          (state, data_state).

        Raises:
          CheckpointError: no checkpoint, a different model, or unreadable files.
          TypeError: a `target` leaf that is not a JAX array or `jax.ShapeDtypeStruct`.
        """
        unplaced = [
            k for k, leaf in leaves_by_name(target).items() if not hasattr(leaf, "sharding")
        ]
        if unplaced:
            raise TypeError(
                f"restore places each leaf as the target's is placed, but {unplaced[0]} "
                f"({len(unplaced)} leaves) is not placed anywhere: give JAX arrays or "
                "ShapeDtypeStructs with a sharding (e.g. training.abstract_train_state), or "
                "read the parameters as NumPy arrays with restore_params"
            )
        step = self._step(step)
        self._check_compatible(step, target)
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target
        )
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()
                ),
            )
        except Exception as e:  # noqa: BLE001 - report any read failure with the path
            path = os.path.join(self.directory, str(step))
            raise CheckpointError(
                f"could not read checkpoint {path} ({brief(e)}). Delete that folder to "
                "resume from the previous checkpoint, or use a new --workdir."
            ) from e
        state = jax.tree.map(_kind_of, restored["state"], target)
        return state, dict(restored["data"] or {})

    def restore_data(self, step: int | None = None) -> dict[str, Any]:
        """Only the data state (the JSON saved beside the train state) of a checkpoint."""
        step = self._step(step)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(data=ocp.args.JsonRestore())
            )
        except Exception as e:  # noqa: BLE001 - report any read failure with the path
            path = os.path.join(self.directory, str(step))
            raise CheckpointError(f"could not read checkpoint {path} ({brief(e)})") from e
        return dict(restored["data"] or {})

    def restore_params(self, step: int | None = None) -> Any:
        """Only the model parameters of a checkpoint, as host numpy arrays.

        For using a trained model (sampling, fine-tuning, export) without building its
        optimizer: the tree and its shapes come from the checkpoint's own metadata, and only
        the parameters' arrays are read from disk (not the optimizer's, which for Adam are
        twice the size).

        Raises:
          CheckpointError: no checkpoint, no parameters in it, or unreadable files.
        """
        step = self._step(step)
        path = os.path.join(self.directory, str(step), "state")
        try:
            # The tree through the manager, which reads the step's own metadata too (Orbax
            # warns of a missing metadata file when the state folder is read on its own).
            tree = self._manager.item_metadata(step)["state"]
            if tree is None or "params" not in tree:
                raise CheckpointError(f"checkpoint {path} holds no model parameters")
            target = {"params": jax.tree.map(_host_array, tree["params"])}
            restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
            # A reader of its own: the manager reads a saved item whole (its handler is the
            # one that wrote it), where this one reads only the subtree named.
            with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
                args = ocp.args.PyTreeRestore(
                    item=target, restore_args=restore_args, partial_restore=True
                )
                return reader.restore(path, args=args)["params"]
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - report any read failure with the path
            raise CheckpointError(
                f"could not read the parameters of checkpoint {path} ({brief(e)})"
            ) from e


def has_checkpoint(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds a complete checkpoint (it is not created if missing).

    A look at the folder's names, which any process may take at any time: Orbax writes a
    step under a temporary name and renames it to the step's number once complete. (A
    Checkpointer's construction is a barrier of all processes, which processes asking
    this at different moments would not agree on.)"""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return False
    return any(n.isdigit() and os.path.isdir(os.path.join(directory, n)) for n in names)


def load_params(directory: str | os.PathLike, step: int | None = None) -> Any:
    """`Checkpointer(directory).restore_params(step)`, closing the checkpointer after (a
    missing `directory` is an error, not created)."""
    if not os.path.isdir(directory):
        raise CheckpointError(f"no checkpoint folder {os.path.abspath(directory)}")
    ckpt = Checkpointer(directory, async_save=False, create=False)
    try:
        return ckpt.restore_params(step)
    finally:
        ckpt.close()
