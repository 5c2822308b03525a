"""LSTM: parity with torch.nn.LSTM, padding provably ignored, gradients, cuDNN packing."""

from __future__ import annotations

import functools
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmodels import rnn

B, T, F, H = 3, 7, 5, 6
KEY = jax.random.key(0)


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, T, F)).astype(np.float32)
    lengths = np.array([7, 4, 1], np.int32)
    return x, lengths


def _init(model, x, lengths, seed=0):
    return nn.meta.unbox(model.init(jax.random.PRNGKey(seed), x, lengths))


def _torch_lstm(params, num_layers, bidirectional):
    torch = pytest.importorskip("torch", reason="needs the reference extra (torch)")
    ref = torch.nn.LSTM(F, H, num_layers, batch_first=True, bidirectional=bidirectional)
    p = params["params"]
    with torch.no_grad():
        for layer in range(num_layers):
            for d, suffix in enumerate(("fwd", "bwd")[: 2 if bidirectional else 1]):
                tail = "_reverse" if d else ""
                pre = f"l{layer}_{suffix}_"
                getattr(ref, f"weight_ih_l{layer}{tail}").copy_(
                    torch.tensor(np.asarray(p[pre + "input_kernel"]).T)
                )
                getattr(ref, f"weight_hh_l{layer}{tail}").copy_(
                    torch.tensor(np.asarray(p[pre + "recurrent_kernel"]).T)
                )
                getattr(ref, f"bias_ih_l{layer}{tail}").copy_(
                    torch.tensor(np.asarray(p[pre + "bias"]))
                )
                getattr(ref, f"bias_hh_l{layer}{tail}").zero_()
    return torch, ref


@pytest.mark.reference
@pytest.mark.parametrize("num_layers,bidirectional", [(1, False), (2, False), (1, True), (2, True)])
def test_matches_torch_lstm_with_padding(num_layers, bidirectional):
    x, lengths = _inputs()
    model = rnn.LSTM(H, num_layers, bidirectional, backend="scan")
    params = _init(model, x, lengths)
    rng = np.random.default_rng(1)
    n = num_layers * (2 if bidirectional else 1)
    h0 = rng.normal(size=(n, B, H)).astype(np.float32)
    c0 = rng.normal(size=(n, B, H)).astype(np.float32)
    ys, (h_n, c_n) = model.apply(params, x, lengths, (h0, c0))

    torch, ref = _torch_lstm(params, num_layers, bidirectional)
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        torch.tensor(x), torch.tensor(lengths), batch_first=True, enforce_sorted=False
    )
    out, (th, tc) = ref(packed, (torch.tensor(h0), torch.tensor(c0)))
    tys, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=T)
    np.testing.assert_allclose(ys, tys.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(h_n, th.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(c_n, tc.detach().numpy(), atol=1e-5)


@pytest.mark.reference
def test_cell_matches_torch_lstm_cell():
    torch = pytest.importorskip("torch", reason="needs the reference extra (torch)")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(B, F)).astype(np.float32)
    h = rng.normal(size=(B, H)).astype(np.float32)
    c = rng.normal(size=(B, H)).astype(np.float32)
    cell = rnn.LSTMCell(H)
    params = nn.meta.unbox(cell.init(jax.random.PRNGKey(0), (h, c), x))
    (h1, c1), out = cell.apply(params, (h, c), x)
    ref = torch.nn.LSTMCell(F, H)
    p = params["params"]
    with torch.no_grad():
        ref.weight_ih.copy_(torch.tensor(np.asarray(p["input_kernel"]).T))
        ref.weight_hh.copy_(torch.tensor(np.asarray(p["recurrent_kernel"]).T))
        ref.bias_ih.copy_(torch.tensor(np.asarray(p["bias"])))
        ref.bias_hh.zero_()
    th, tc = ref(torch.tensor(x), (torch.tensor(h), torch.tensor(c)))
    np.testing.assert_allclose(h1, th.detach().numpy(), atol=1e-6)
    np.testing.assert_allclose(c1, tc.detach().numpy(), atol=1e-6)
    np.testing.assert_array_equal(out, h1)


def test_cell_is_the_articles_equations():
    rng = np.random.default_rng(0)
    x, h, c = (rng.normal(size=(2, n)).astype(np.float32) for n in (F, H, H))
    cell = rnn.LSTMCell(H)
    params = nn.meta.unbox(cell.init(jax.random.PRNGKey(0), (h, c), x))
    p = params["params"]
    z = x @ p["input_kernel"] + h @ p["recurrent_kernel"] + p["bias"]
    sig = lambda v: 1 / (1 + np.exp(-v))
    i, f, g, o = np.split(np.asarray(z), 4, axis=-1)
    c_ref = sig(f) * c + sig(i) * np.tanh(g)
    h_ref = sig(o) * np.tanh(c_ref)
    (h1, c1), _ = cell.apply(params, (h, c), x)
    np.testing.assert_allclose(c1, c_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h1, h_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_padded_steps_are_ignored(bidirectional):
    """Changing what lies past each sequence's length changes nothing."""
    x, lengths = _inputs()
    model = rnn.LSTM(H, 2, bidirectional, backend="scan")
    params = _init(model, x, lengths)
    garbage = x.copy()
    for b, n in enumerate(lengths):
        garbage[b, n:] = 1e3 * np.random.default_rng(b).normal(size=(T - n, F))
    a_ys, (a_h, a_c) = model.apply(params, x, lengths)
    b_ys, (b_h, b_c) = model.apply(params, garbage, lengths)
    np.testing.assert_array_equal(a_ys, b_ys)
    np.testing.assert_array_equal(a_h, b_h)
    np.testing.assert_array_equal(a_c, b_c)
    for b, n in enumerate(lengths):
        assert np.all(np.asarray(a_ys)[b, n:] == 0)
    # ... and a sequence alone, unpadded, gives the same outputs and final state.
    n = lengths[1]
    alone_ys, (alone_h, _) = model.apply(params, x[1:2, :n], np.array([n]))
    np.testing.assert_allclose(alone_ys[0], a_ys[1, :n], atol=1e-6)
    np.testing.assert_allclose(alone_h[:, 0], a_h[:, 1], atol=1e-6)


def test_gradients_match_finite_differences():
    x, lengths = _inputs()
    x = x[:, :4].astype(np.float64)
    lengths = np.array([4, 3, 1], np.int32)
    with jax.enable_x64():
        model = rnn.LSTM(3, 2, True, backend="scan", dtype=jnp.float64, param_dtype=jnp.float64)
        params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), x, lengths))

        def loss(p):
            ys, (h, c) = model.apply(p, x, lengths)
            return jnp.sum(ys**2) + jnp.sum(jnp.sin(h)) + jnp.sum(c)

        loss = jax.jit(loss)
        grads = jax.grad(loss)(params)
        flat, unravel = jax.flatten_util.ravel_pytree(params)
        g_flat, _ = jax.flatten_util.ravel_pytree(grads)
        assert np.all(np.isfinite(g_flat))
        rng = np.random.default_rng(0)
        eps = 1e-6
        for i in rng.choice(flat.size, 12, replace=False):
            e = jnp.zeros_like(flat).at[i].set(eps)
            fd = (loss(unravel(flat + e)) - loss(unravel(flat - e))) / (2 * eps)
            np.testing.assert_allclose(g_flat[i], fd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    "dtype,unroll,tol", [("float32", 1, 1e-5), ("float32", 3, 1e-5), ("bfloat16", 1, 2e-2)]
)
def test_hand_written_backward_equals_autodiff_of_the_scan(dtype, unroll, tol):
    """The recurrence's custom VJP (weight gradient as one matmul after the loop) against
    JAX's own derivative of the same lax.scan: padding, initial states, every input."""
    rng = np.random.default_rng(1)
    dtype = jnp.dtype(dtype)
    zx = jnp.asarray(rng.normal(size=(T, B, 4 * H)), jnp.float32)
    mask = (np.arange(T)[:, None] < np.array([7, 4, 1])[None, :])[..., None]
    h0, c0 = (jnp.asarray(rng.normal(size=(B, H)), jnp.float32) for _ in range(2))
    wh = jnp.asarray(rng.normal(size=(H, 4 * H)) / np.sqrt(H), jnp.float32)  # the parameter
    dys = jnp.asarray(rng.normal(size=(T, B, H)), jnp.float32)

    def loss(fn, zx, h0, c0, wh):
        ys, h, c = fn(zx, mask, h0, c0, wh, dtype, unroll)
        return jnp.sum(ys * dys) + jnp.sum(jnp.sin(h)) + jnp.sum(c**2)

    args = (zx, h0, c0, wh)
    want = jax.jit(jax.grad(lambda *a: loss(rnn._recurrence_scan, *a), argnums=(0, 1, 2, 3)))(*args)
    got = jax.jit(jax.grad(lambda *a: loss(rnn._recurrence, *a), argnums=(0, 1, 2, 3)))(*args)
    for name, a, b in zip(("zx", "h0", "c0", "wh"), got, want, strict=True):
        assert a.dtype == b.dtype, name
        scale = float(jnp.max(jnp.abs(b.astype(jnp.float32)))) + 1e-6
        err = float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
        assert err <= tol * scale, (name, err, scale)
    # The forward pass is the scan's, exactly.
    for a, b in zip(
        rnn._recurrence(zx, mask, h0, c0, wh, dtype, unroll),
        rnn._recurrence_scan(zx, mask, h0, c0, wh, dtype, unroll),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def _sub_jaxprs(eqn):
    """The jaxprs an equation holds in its parameters (a scan's body, a cond's branches, a
    custom VJP's function, ...)."""
    for value in eqn.params.values():
        for sub in value if isinstance(value, (list, tuple)) else [value]:
            if hasattr(sub, "eqns"):  # a Jaxpr
                yield sub
            elif hasattr(getattr(sub, "jaxpr", None), "eqns"):  # a ClosedJaxpr
                yield sub.jaxpr


def _scan_outputs_per_step(jaxpr) -> list[list[tuple]]:
    """The per-step (stacked) outputs of every scan in `jaxpr`: lists of (dtype, shape)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan":
            carry = eqn.params["num_carry"]
            found.append([(str(v.aval.dtype), v.aval.shape) for v in eqn.outvars[carry:]])
        for sub in _sub_jaxprs(eqn):
            found += _scan_outputs_per_step(sub)
    return found


def test_loops_write_only_what_the_backward_pass_needs():
    """Each step of the forward loop writes its gates and one [2, batch, H] array (output and
    cell state), not also its h in the matmul dtype (the backward pass takes that from the
    outputs); the backward loop writes its gate gradients. On GPUs every array a loop's step
    writes is a kernel per step."""
    zx = jnp.ones((T, B, 4 * H), jnp.float32)
    mask = jnp.ones((T, B, 1), bool)
    h0 = c0 = jnp.zeros((B, H), jnp.float32)
    wh = jnp.ones((H, 4 * H), jnp.float32)
    dtype = jnp.dtype(jnp.bfloat16)

    def loss(zx, wh):
        ys, h, c = rnn._recurrence(zx, mask, h0, c0, wh, dtype, 1)
        return jnp.sum(ys) + jnp.sum(h) + jnp.sum(c)

    forward = jax.make_jaxpr(lambda zx, wh: rnn._recurrence(zx, mask, h0, c0, wh, dtype, 1))
    saved = [("float32", (T, 2, B, H)), ("float32", (T, B, 4 * H))]
    assert _scan_outputs_per_step(forward(zx, wh).jaxpr) == [saved]
    scans = _scan_outputs_per_step(jax.make_jaxpr(jax.grad(loss, (0, 1)))(zx, wh).jaxpr)
    assert scans == [saved, [("float32", (T, B, 4 * H))]]


def _unroll_by_platform(jaxpr) -> list[dict]:
    """For each `platform_dependent` choice in `jaxpr`: {platform: the scans' unroll factors
    in the branch lowered for it} (None: any other platform)."""
    found, index_platforms = [], {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "platform_index":
            index_platforms[eqn.outvars[0]] = eqn.params["platforms"]
        elif eqn.primitive.name == "cond" and eqn.invars[0] in index_platforms:
            choice = {}
            for platforms, branch in zip(
                index_platforms[eqn.invars[0]], eqn.params["branches"], strict=True
            ):
                unrolls = {
                    e.params["unroll"] for e in branch.jaxpr.eqns if e.primitive.name == "scan"
                }
                for platform in platforms or (None,):
                    choice[platform] = unrolls
            found.append(choice)
        elif eqn.primitive.name != "cond":
            for sub in _sub_jaxprs(eqn):
                found += _unroll_by_platform(sub)
    return found


def test_default_unroll_is_chosen_by_the_platform_the_step_is_lowered_for():
    """unroll None: the forward and backward loops unroll `GPU_UNROLL` times where lowered
    for a GPU, once elsewhere; on this CPU the numbers are those of unroll=1."""
    zx = jnp.asarray(np.random.default_rng(0).normal(size=(T, B, 4 * H)), jnp.float32)
    mask = (np.arange(T)[:, None] < np.array([7, 4, 1])[None, :])[..., None]
    h0 = jnp.zeros((B, H), jnp.float32)
    wh = jnp.asarray(np.random.default_rng(1).normal(size=(H, 4 * H)) / 3, jnp.float32)
    f32 = jnp.dtype(jnp.float32)

    def loss(unroll, zx, wh):
        ys, h, c = rnn._recurrence(zx, mask, h0, h0, wh, f32, unroll)
        return jnp.sum(ys * ys) + jnp.sum(h) + jnp.sum(c)

    jaxpr = jax.make_jaxpr(jax.grad(functools.partial(loss, None), (0, 1)))(zx, wh)
    want = {"cuda": {rnn.GPU_UNROLL}, "rocm": {rnn.GPU_UNROLL}, None: {1}}
    assert rnn.GPU_UNROLL > 1
    assert _unroll_by_platform(jaxpr.jaxpr) == [want, want]  # forward, backward
    for a, b in zip(
        jax.jit(jax.grad(functools.partial(loss, None), (0, 1)))(zx, wh),
        jax.jit(jax.grad(functools.partial(loss, 1), (0, 1)))(zx, wh),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_cudnn_weight_packing_matches_jax_reference(bidirectional):
    """The cuDNN backend's weight packing, checked on CPU with jax.experimental.rnn's
    pure-JAX reference of the same kernel."""
    from jax.experimental import rnn as jrnn

    x, lengths = _inputs()
    model = rnn.LSTM(H, 2, bidirectional, backend="scan")
    params = _init(model, x, lengths)
    ys, (h_n, c_n) = model.apply(params, x, lengths)
    p = params["params"]
    dirs = ("fwd", "bwd")[: 2 if bidirectional else 1]
    triples = [
        (p[f"l{i}_{d}_input_kernel"], p[f"l{i}_{d}_recurrent_kernel"], p[f"l{i}_{d}_bias"])
        for i in range(2)
        for d in dirs
    ]
    weights = rnn.pack_cudnn_weights(triples)
    assert weights.size == jrnn.get_num_params_in_lstm(F, H, 2, bidirectional)
    w_ih, w_hh, b_ih, b_hh = jrnn.unpack_lstm_weights(weights, F, H, 2, bidirectional)
    zeros = jnp.zeros((len(triples), B, H))
    ref_y, ref_h, ref_c = jrnn.lstm_ref(
        x, zeros, zeros, w_ih, w_hh, b_ih, b_hh, lengths, F, H, 2, 0.0, bidirectional
    )
    mask = np.arange(T)[None, :, None] < lengths[:, None, None]
    np.testing.assert_allclose(ys, np.where(mask, ref_y, 0), atol=1e-5)
    np.testing.assert_allclose(h_n, ref_h, atol=1e-5)
    np.testing.assert_allclose(c_n, ref_c, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not rnn.cudnn_available(), reason="needs an NVIDIA GPU (cuDNN)")
@pytest.mark.parametrize("bidirectional", [False, True])
def test_cudnn_backend_equals_scan(bidirectional):
    x, lengths = _inputs()
    scan = rnn.LSTM(H, 2, bidirectional, backend="scan")
    cudnn = rnn.LSTM(H, 2, bidirectional, backend="cudnn")
    params = _init(scan, x, lengths)
    a = scan.apply(params, x, lengths)
    b = cudnn.apply(params, x, lengths)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, atol=1e-4)


def test_auto_takes_the_scan_path_while_dropout_is_on(monkeypatch):
    """On a GPU "auto" means cuDNN, whose LSTM here has no dropout between layers: training
    with dropout takes the scan path (was: an error), evaluation and one layer take cuDNN."""
    x, lengths = _inputs()
    calls = []

    def fake_cudnn(self, x, *args):
        calls.append(self.num_layers)
        return x, None

    monkeypatch.setattr(rnn, "cudnn_available", lambda: True)  # as on an NVIDIA GPU
    monkeypatch.setattr(rnn.LSTM, "_cudnn", fake_cudnn)
    auto, scan = rnn.LSTM(H, 2, dropout=0.3), rnn.LSTM(H, 2, dropout=0.3, backend="scan")
    params = _init(scan, x, lengths)

    def train(model):
        return model.apply(params, x, lengths, deterministic=False, rngs={"dropout": KEY})

    for u, v in zip(jax.tree.leaves(train(auto)), jax.tree.leaves(train(scan)), strict=True):
        np.testing.assert_array_equal(u, v)
    assert calls == []
    auto.apply(params, x, lengths)  # evaluation: no dropout
    one = rnn.LSTM(H, 1, dropout=0.3)
    one_params = _init(one, x, lengths)
    one.apply(one_params, x, lengths, deterministic=False, rngs={"dropout": KEY})
    assert calls == [2, 1, 1]  # evaluation; initialisation and training of one layer
    with pytest.raises(ValueError, match="backend 'auto'"):
        train(rnn.LSTM(H, 2, dropout=0.3, backend="cudnn"))


@pytest.mark.parametrize("platform_version, nvidia", [("rocm 6.3", False), ("cuda 12.8", True)])
def test_cudnn_is_available_on_an_nvidia_gpu_only(monkeypatch, platform_version, nvidia):
    """A ROCm GPU is a "gpu" backend too, but its MIOpen takes no cuDNN-packed weights: there
    "auto" takes the scan path (simulated devices: the default backend and its client)."""
    device = types.SimpleNamespace(client=types.SimpleNamespace(platform_version=platform_version))
    x, lengths = _inputs()
    scan = rnn.LSTM(H, backend="scan")
    params = _init(scan, x, lengths)
    calls = []

    def fake_cudnn(self, x, *args):
        calls.append(self.num_layers)
        return x, None

    monkeypatch.setattr(rnn.LSTM, "_cudnn", fake_cudnn)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *args: [device])
    assert rnn.cudnn_available() is nvidia
    out = rnn.LSTM(H).apply(params, x, lengths)
    if nvidia:
        assert calls == [1]
    else:
        assert calls == []
        for u, v in zip(
            jax.tree.leaves(out), jax.tree.leaves(scan.apply(params, x, lengths)), strict=True
        ):
            np.testing.assert_array_equal(u, v)


def test_cudnn_backend_off_a_gpu_and_bad_shapes_are_clear_errors():
    x, lengths = _inputs()
    model = rnn.LSTM(H, backend="cudnn")
    if not rnn.cudnn_available():
        with pytest.raises(ValueError, match="backend='cudnn' needs an NVIDIA GPU"):
            model.init(KEY, x, lengths)
    with pytest.raises(ValueError, match=r"x must be \[batch, time, features\], got shape"):
        rnn.LSTM(H).init(KEY, x[0])


def test_unroll_does_not_change_numbers():
    x, lengths = _inputs()
    a = rnn.LSTM(H, 2, backend="scan")
    params = _init(a, x, lengths)
    b = rnn.LSTM(H, 2, backend="scan", unroll=4)
    for u, v in zip(
        jax.tree.leaves(a.apply(params, x, lengths)),
        jax.tree.leaves(b.apply(params, x, lengths)),
        strict=True,
    ):
        np.testing.assert_allclose(u, v, atol=1e-6)


def test_dropout_between_layers_only_in_training():
    x, lengths = _inputs()
    model = rnn.LSTM(H, 2, dropout=0.5, backend="scan")
    params = _init(model, x, lengths)
    a = model.apply(params, x, lengths)[0]
    b = model.apply(params, x, lengths)[0]
    np.testing.assert_array_equal(a, b)
    c = model.apply(
        params, x, lengths, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)}
    )[0]
    assert not np.allclose(a, c)


@pytest.mark.parametrize("pooling", rnn.POOLINGS)
@pytest.mark.parametrize("bidirectional", [False, True])
def test_classifier_shapes_and_padding(pooling, bidirectional):
    model = rnn.LSTMClassifier(50, 8, 12, 2, 4, bidirectional=bidirectional, pooling=pooling)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 50, size=(3, 9)).astype(np.int32)
    lengths = np.array([9, 5, 2], np.int32)
    params = model.init(jax.random.PRNGKey(0), tokens, lengths)
    logits = model.apply(params, tokens, lengths)
    assert logits.shape == (3, 4) and logits.dtype == jnp.float32
    other = tokens.copy()
    other[1, 5:] = 7
    other[2, 2:] = 3
    np.testing.assert_allclose(model.apply(params, other, lengths), logits, atol=1e-6)


@pytest.mark.parametrize("pooling", rnn.POOLINGS)
def test_an_empty_sequence_under_jit_gives_finite_logits(pooling):
    """Lengths must be >= 1 where they are concrete; under jit they cannot be checked, and
    "max" gave NaN logits (the maximum over no steps), so a padding row of weight 0 made an
    evaluation's weighted loss NaN."""
    model = rnn.LSTMClassifier(50, 8, 12, 1, 4, pooling=pooling)
    tokens = np.ones((2, 5), np.int32)
    params = model.init(jax.random.PRNGKey(0), tokens, np.array([5, 5], np.int32))
    logits = jax.jit(model.apply)(params, tokens, np.array([5, 0], np.int32))
    assert np.isfinite(np.asarray(logits)).all(), logits


def test_articles_classifier_size():
    model = rnn.LSTMClassifier(10000, 64, 128, 2, 10)
    shapes = jax.eval_shape(
        model.init, jax.random.PRNGKey(0), jnp.zeros((1, 100), jnp.int32), jnp.array([100])
    )
    n = sum(x.size for x in jax.tree.leaves(nn.meta.unbox(shapes)))
    # Keras: Embedding 640,000 + LSTM 98,816 + LSTM 131,584 + Dense 1,290 (two LSTM biases in
    # Keras are one here, as in cuDNN's sum of b_ih + b_hh).
    assert n == 640_000 + (4 * 128 * (64 + 128) + 512) + (4 * 128 * 256 + 512) + 1_290


# ----------------------------------------------------------------------------- bad input


def _classifier_and_params():
    model = rnn.LSTMClassifier(20, 4, 5, 1, 2)
    tokens = np.ones((2, 6), np.int32)
    params = model.init(jax.random.PRNGKey(0), tokens, np.array([6, 3]))
    return model, params, tokens


def test_token_id_out_of_vocabulary():
    model, params, tokens = _classifier_and_params()
    bad = tokens.copy()
    bad[0, 2] = 20
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 20\).*found 20"):
        model.apply(params, bad, np.array([6, 3]))
    bad[0, 2] = -1
    with pytest.raises(ValueError, match="found -1"):
        model.apply(params, bad, np.array([6, 3]))


@pytest.mark.parametrize(
    "lengths,message",
    [
        (np.array([6, -1]), "must be >= 1"),
        (np.array([6, 0]), "empty sequences"),
        (np.array([6, 7]), "must be <= the sequence length 6"),
        (np.array([6, 3, 2]), "one length per sequence"),
    ],
)
def test_bad_lengths(lengths, message):
    model, params, tokens = _classifier_and_params()
    with pytest.raises(ValueError, match=message):
        model.apply(params, tokens, lengths)


def test_bad_initial_state_shape():
    x, lengths = _inputs()
    model = rnn.LSTM(H, 2)
    params = _init(model, x, lengths)
    with pytest.raises(ValueError, match="initial_state must be two arrays"):
        model.apply(params, x, lengths, (np.zeros((1, B, H)), np.zeros((1, B, H))))
