"""Checkpoints: round trip, another mesh, keep-last-K, atomicity, clear errors."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from jaxmodels import checkpoint, cnn, optim, sharding, training
from jaxmodels.errors import CheckpointError, CheckpointMismatchError
from tests.helpers import ROOT, app_env


def _state(mesh_kw, rules_name="fsdp", model=None, seed=0):
    mesh = sharding.make_mesh(**mesh_kw)
    model = model or cnn.SeedCNN()
    tx = optim.make_optimizer("adamw", 1e-3, total_steps=10, weight_decay=0.1)
    return training.create_train_state(
        model,
        tx,
        [jnp.zeros((1, 28, 28, 1))],
        jax.random.PRNGKey(seed),
        mesh,
        sharding.logical_rules(rules_name),
    )


def _assert_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_with_data_state(tmp_path):
    state, _ = _state({"data": 2, "fsdp": 4})
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(7, state, {"iterator": {"next_index": 7}})
    ckpt.wait()
    assert ckpt.latest_step() == 7
    fresh, _ = _state({"data": 2, "fsdp": 4}, seed=1)
    restored, data = ckpt.restore(fresh)
    _assert_equal(restored, state)
    assert data == {"iterator": {"next_index": 7}}
    ckpt.close()


def test_a_data_state_that_is_not_json_is_refused_at_save(tmp_path):
    """Was: `save` returned, the background write failed with some 400 lines of tracebacks
    that did not name the data state, and the step was lost."""
    state, _ = _state({"data": 2, "fsdp": 4})
    ckpt = checkpoint.Checkpointer(tmp_path)
    with pytest.raises(TypeError, match="data_state must be plain JSON.*int64.*int\\(x\\)"):
        ckpt.save(7, state, {"iterator": {"next_index": np.int64(7)}})
    ckpt.save(8, state, {"iterator": {"next_index": 8}, "best": float("inf")})  # as JSON does
    ckpt.wait()
    assert ckpt.all_steps() == [8]
    assert ckpt.restore_data() == {"iterator": {"next_index": 8}, "best": float("inf")}
    ckpt.close()


def test_a_target_without_shardings_is_named(tmp_path):
    """Was "AttributeError: 'numpy.ndarray' object has no attribute 'sharding'"."""
    ckpt = checkpoint.Checkpointer(tmp_path)
    target = {"w": np.zeros(3, np.float32)}
    with pytest.raises(
        TypeError,
        match=r"restore places .* but w \(1 leaves\) is not placed anywhere.*restore_params",
    ):
        ckpt.restore(target)
    ckpt.close()


def test_restore_onto_a_different_mesh(tmp_path):
    state, _ = _state({"data": 2, "fsdp": 4})
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(1, state)
    ckpt.wait()
    target, _ = _state({"data": 8}, rules_name="data", seed=3)
    restored, _ = ckpt.restore(target)
    _assert_equal(restored, state)
    assert restored.params["Dense_0"]["kernel"].sharding.spec == P(None, None)
    assert state.params["Dense_0"]["kernel"].sharding.spec == P("fsdp", None)


def test_keeps_last_k(tmp_path):
    """The steps listed are those on disk after the saves in flight (were: the steps before
    them, one of which keep-last-K then removed)."""
    state, _ = _state({"data": 8}, "data")
    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2)
    for step in (1, 2, 3, 4):
        ckpt.save(step, state)
    assert ckpt.all_steps() == [3, 4]
    assert ckpt.latest_step() == 4
    ckpt.save(5, state)
    assert ckpt.latest_step() == 5
    ckpt.close()


def test_a_step_saved_already_is_named(tmp_path):
    """Was Orbax's StepAlreadyExistsError, not a CheckpointError."""
    state, _ = _state({"data": 8}, "data")
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(2, state, {"step": 2})
    with pytest.raises(CheckpointError, match=r"step 2 is saved already in .*never overwritten"):
        ckpt.save(2, state, {"step": 3})
    assert ckpt.restore_data() == {"step": 2}
    ckpt.close()


def test_a_step_that_is_no_count_or_before_the_latest_is_refused(tmp_path):
    """Were saved: "40" and 30.0 as folders no one lists, -3 too, and 5 after 10 and 20 made
    keep-last-2 delete step 10, a later one."""
    state = {"params": {"w": np.ones(3, np.float32)}}
    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=2, async_save=False)
    ckpt.save(10, state)
    ckpt.save(np.int64(20), state)  # NumPy's integers are steps, and JAX's (state.step)
    assert ckpt.restore_data(step=jnp.asarray(20, jnp.int32)) == {}
    for step in ("40", 30.0, -3, True, jnp.asarray(7.0), np.arange(2)):
        with pytest.raises(ValueError, match="a checkpoint step is a non-negative integer"):
            ckpt.save(step, state)
    with pytest.raises(CheckpointError, match=r"step 5 is before the latest checkpoint .*20"):
        ckpt.save(5, state)
    with pytest.raises(
        ValueError, match=r"got '20' \(str\)"
    ):  # was "no step 20; its steps: [.., 20]"
        ckpt.restore_data(step="20")
    assert ckpt.all_steps() == [10, 20] and sorted(os.listdir(tmp_path)) == ["10", "20"]
    ckpt.close()


def test_a_directory_that_cannot_take_checkpoints_is_refused_at_once(tmp_path, monkeypatch):
    """Was found by the first save, in the background, after which Orbax's other threads of
    that save waited for ever: the process never ended."""
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(CheckpointError, match="checkpoint directory .*a_file is a file"):
        checkpoint.Checkpointer(tmp_path / "a_file")
    locked = str(tmp_path / "locked")
    os.mkdir(locked)
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: p != locked and access(p, mode))
    with pytest.raises(CheckpointError, match=r"cannot write checkpoints in .*locked \(not"):
        checkpoint.Checkpointer(locked)
    checkpoint.Checkpointer(locked, create=False).close()  # reading needs no writing


_FOLDER_GONE = """
import os, shutil, sys
import jax.numpy as jnp
from jaxmodels import checkpoint
from jaxmodels.errors import CheckpointError
directory = sys.argv[1]
ckpt = checkpoint.Checkpointer(directory)
ckpt.save(1, {"w": jnp.ones(8)})
ckpt.wait()
shutil.rmtree(directory)  # what was a folder is now a file: no step folder can be made
open(directory, "w").close()
try:
    ckpt.save(2, {"w": jnp.ones(8)})
except CheckpointError as e:
    print(e)
ckpt.close()
"""


def test_a_save_that_cannot_make_its_folder_fails_at_once_and_the_process_ends(tmp_path):
    """Was a failure in the background (from `wait`), after which Orbax's other threads of
    that save waited 20 minutes for their signal before the process could end (as when
    the checkpoints' file system turns read-only mid-run)."""
    directory = str(tmp_path / "checkpoints")
    proc = subprocess.run(
        [sys.executable, "-c", _FOLDER_GONE, directory],
        capture_output=True,
        text=True,
        timeout=120,
        env=app_env(),
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"saving step 2 in {directory} failed: NotADirectoryError" in proc.stdout
    assert "Check that the folder is writable and has space" in proc.stdout


def test_a_save_that_fails_in_the_background_is_a_checkpoint_error(tmp_path, monkeypatch):
    """Was TensorStore's ValueError, whose message names the disk being full some 300
    characters in, after pages of Orbax's tracebacks."""
    ckpt = checkpoint.Checkpointer(tmp_path)
    full = ValueError(
        'RESOURCE_EXHAUSTED: Error writing "opt_state.mu" ... No space left on device'
    )
    for error, message in ((full, "no space left on the device"), (OSError("boom"), "boom")):

        def failing(error=error):
            raise error

        monkeypatch.setattr(ckpt._manager, "wait_until_finished", failing)
        with pytest.raises(CheckpointError, match=f"in {tmp_path} failed.*{message}"):
            ckpt.wait()
        # The next save says so too (was Orbax's raw error, or an OSError reported as the
        # next step's failure).
        with pytest.raises(CheckpointError, match=f"a checkpoint in {tmp_path} failed.*{message}"):
            ckpt.save(7, {"w": jnp.ones(2)})
    monkeypatch.undo()
    ckpt.close()


def test_unfinished_save_is_ignored(tmp_path):
    state, _ = _state({"data": 8}, "data")
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(1, state)
    ckpt.wait()
    # What an interrupted save leaves behind: a temporary folder, never renamed.
    shutil.copytree(tmp_path / "1", tmp_path / "2.orbax-checkpoint-tmp-123")
    assert checkpoint.Checkpointer(tmp_path).latest_step() == 1


def test_unfinished_save_is_no_checkpoint_to_has_checkpoint(tmp_path, monkeypatch):
    """A look at the folder's names, no Orbax manager (whose construction is a barrier of
    all processes)."""
    assert not checkpoint.has_checkpoint(tmp_path / "nowhere")
    assert not (tmp_path / "nowhere").exists()
    (tmp_path / "2.orbax-checkpoint-tmp-123").mkdir()
    assert not checkpoint.has_checkpoint(tmp_path)
    state, _ = _state({"data": 8}, "data")
    ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, state)
    ckpt.close()

    def no_manager(*args, **kwargs):
        raise AssertionError("has_checkpoint made an Orbax manager (a barrier)")

    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", no_manager)
    assert checkpoint.has_checkpoint(tmp_path)


def test_uses_that_would_lose_checkpoints_are_refused(tmp_path):
    """Were: max_to_keep=0 deleted each checkpoint as soon as it was written; a data state
    of a list saved and could not be restored; a save after close() failed in Orbax's
    thread pool ("cannot schedule new futures after shutdown"), leaving a temporary folder."""
    with pytest.raises(ValueError, match=r"max_to_keep=0 would delete every checkpoint.*None: all"):
        checkpoint.Checkpointer(tmp_path, max_to_keep=0)
    state, _ = _state({"data": 8}, "data")
    ckpt = checkpoint.Checkpointer(tmp_path, max_to_keep=None)
    with pytest.raises(TypeError, match=r"data_state must be a dict \(a JSON object\), got list"):
        ckpt.save(1, state, [1, 2])
    for step in (1, 2, 3, 4):
        ckpt.save(step, state)
    ckpt.close()
    with pytest.raises(RuntimeError, match="is closed: save with a new one"):
        ckpt.save(5, state)
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3", "4"]


def test_restore_reads_the_save_in_flight(tmp_path):
    """Was: the step before it, while latest_step() said the new one a moment later."""
    state, _ = _state({"data": 8}, "data")
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(1, state, {"step": 1})
    ckpt.save(2, state, {"step": 2})
    assert ckpt.restore(state)[1] == {"step": 2}
    ckpt.close()


def test_another_optimizer_of_the_same_arrays_is_named(tmp_path):
    """adam's and adamw's states hold the same arrays in trees of another structure: was
    Orbax's "tree structures do not match" as an unreadable checkpoint, with the advice to
    delete it."""
    state, _ = _state({"data": 8}, "data")  # adamw
    ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, state)
    mesh = sharding.make_mesh(data=8)
    other, _ = training.create_train_state(
        cnn.SeedCNN(),
        optim.make_optimizer("adam", 1e-3, total_steps=10),
        [jnp.zeros((1, 28, 28, 1))],
        jax.random.PRNGKey(0),
        mesh,
        sharding.logical_rules("data"),
    )
    with pytest.raises(CheckpointMismatchError, match=r"(?s)different model or optimizer.*empty"):
        ckpt.restore(other)
    restored, _ = ckpt.restore(state)  # its own kind still restores
    ckpt.close()
    # Empty nodes of another kind (a FrozenDict, which Orbax records as {}) are no change.
    frozen = state.replace(model_state=flax.core.FrozenDict({}))
    ckpt = checkpoint.Checkpointer(tmp_path / "frozen", async_save=False)
    ckpt.save(1, frozen)
    ckpt.restore(frozen)
    ckpt.restore(state)
    ckpt.close()


def test_different_model_is_named(tmp_path):
    state, _ = _state({"data": 8}, "data")
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(1, state)
    ckpt.wait()
    other, _ = _state({"data": 8}, "data", model=cnn.SeedCNN(num_classes=5))
    with pytest.raises(CheckpointMismatchError, match=r"(?s)different model.*params/Dense_1/ke"):
        ckpt.restore(other)


def test_corrupt_checkpoint_is_reported_with_its_path(tmp_path):
    state, _ = _state({"data": 8}, "data")
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(1, state)
    ckpt.wait()
    state_dir = tmp_path / "1" / "state"
    for root, _, files in os.walk(state_dir):
        for f in files:
            if f != "_METADATA":
                os.remove(os.path.join(root, f))
    with pytest.raises(CheckpointError, match=str(tmp_path / "1")) as raised:
        checkpoint.Checkpointer(tmp_path).restore(state)
    assert (tmp_path / "1").exists(), "a failed restore must not delete anything"
    assert not isinstance(raised.value, CheckpointMismatchError)  # unreadable, not another model
    assert len(str(raised.value)) < 600  # the cause's first line, not TensorStore's pages


def test_no_checkpoint_is_an_error(tmp_path):
    state, _ = _state({"data": 8}, "data")
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        checkpoint.Checkpointer(tmp_path).restore(state)


def test_a_step_there_is_not_names_those_there_are(tmp_path):
    """Was: "checkpoint .../7 is unreadable (FileNotFoundError ...). Delete that folder"."""
    state, _ = _state({"data": 8}, "data")
    ckpt = checkpoint.Checkpointer(tmp_path)
    for step in (2, 4):
        ckpt.save(step, state)
    ckpt.wait()
    with pytest.raises(CheckpointError, match=r"no complete checkpoint of step 7 .*: \[2, 4\]"):
        ckpt.restore(state, step=7)
    with pytest.raises(CheckpointError, match=r"of step 7 .*: \[2, 4\]"):
        ckpt.restore_params(step=7)
    ckpt.close()


def test_loading_from_a_missing_folder_does_not_create_it(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        checkpoint.load_params(tmp_path / "typo")
    assert not (tmp_path / "typo").exists()


def test_restore_params_reads_only_the_parameters(tmp_path, caplog):
    state, _ = _state({"data": 2, "fsdp": 4})
    ckpt = checkpoint.Checkpointer(tmp_path)
    ckpt.save(3, state)
    ckpt.wait()
    params = ckpt.restore_params()
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
    _assert_equal(params, state.params)
    # (Read on its own, the state folder made Orbax warn "Metadata file does not exist",
    # which reads like a broken checkpoint; samplers printed it every time.)
    assert "does not exist" not in caplog.text
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        checkpoint.Checkpointer(tmp_path / "empty").restore_params()
    ckpt.close()


def test_restore_params_leaves_the_optimizer_state_on_disk(tmp_path, monkeypatch):
    """Was: the whole state read (the AdamW moments are twice the parameters) and the
    parameters kept."""
    state, _ = _state({"data": 8}, "data")
    ckpt = checkpoint.Checkpointer(tmp_path, async_save=False)
    ckpt.save(1, state)
    handler = ocp.type_handlers.NumpyHandler
    read, deserialize = [], handler.deserialize

    async def spy(self, infos, args=None):
        read.extend(info.name for info in infos)
        return await deserialize(self, infos, args)

    monkeypatch.setattr(handler, "deserialize", spy)
    params = ckpt.restore_params()
    _assert_equal(params, state.params)
    n_params = len(jax.tree.leaves(state.params))
    assert len(read) == n_params and all(name.startswith("params.") for name in read), read
    ckpt.close()


def test_restore_gives_the_kind_of_prng_key_the_target_has(tmp_path):
    """Was the kind the checkpoint had: a state saved with `jax.random.PRNGKey` (raw
    uint32[2]) came back so onto a target of typed keys (`jax.random.key`), and the other
    way round."""
    mesh, rules = sharding.make_mesh(data=8), sharding.logical_rules("data")
    tx = optim.make_optimizer("sgd", 0.1, total_steps=10)
    model, example = cnn.SeedCNN(), [jnp.zeros((1, 28, 28, 1))]
    for saved_key, target_key in (
        (jax.random.PRNGKey(3), None),  # the target's default: a typed key
        (jax.random.key(3), jax.random.PRNGKey(0)),
    ):
        state, _ = training.create_train_state(model, tx, example, saved_key, mesh, rules)
        ckpt = checkpoint.Checkpointer(tmp_path / str(target_key is None), async_save=False)
        ckpt.save(1, state)
        target, _ = training.abstract_train_state(model, tx, example, mesh, rules, rng=target_key)
        restored, _ = ckpt.restore(target)
        ckpt.close()
        assert restored.rng.dtype == target.rng.dtype and restored.rng.shape == target.rng.shape
        raw = [
            jax.random.key_data(k) if k.dtype != jnp.uint32 else k
            for k in (state.rng, restored.rng)
        ]
        np.testing.assert_array_equal(*raw)
