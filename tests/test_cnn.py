"""Tests for jaxmodels.cnn: shapes, parameter counts, dtypes, sharding metadata, PyTorch parity."""

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmodels.cnn import (
    BottleneckResNetBlock,
    ResNet,
    ResNet18,
    ResNet50,
    ResNetBlock,
    SeedCNN,
)


def _num_params(model, shape):
    """Counts parameters abstractly (no FLOPs, no memory) via eval_shape of init."""
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))
    return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(variables["params"]))


def _tiny_resnet(**kwargs):
    kwargs = {"num_classes": 10, "num_filters": 8, **kwargs}
    return ResNet18(**kwargs)


@pytest.fixture(scope="module")
def tiny_variables():
    """Variables of ``_tiny_resnet(small_images=True)``, initialised once for the module.

    Random-normal initialisers are slow to compile on CPU, so the ResNet tests share one init
    (with the "rbg" PRNG, which compiles faster than the default threefry). The parameters do not
    depend on the input resolution (global average pooling) nor on the computation dtype, so they
    fit every ``_tiny_resnet(small_images=True, ...)`` model.
    """
    model = _tiny_resnet(small_images=True)
    return jax.jit(model.init)(jax.random.key(0, impl="rbg"), jnp.zeros((1, 16, 16, 3)))


# --------------------------------------------------------------------------- SeedCNN


def test_seed_cnn_output_shape():
    model = SeedCNN()
    x = jnp.ones((3, 28, 28, 1))
    variables = model.init(jax.random.key(0), x)
    logits = model.apply(variables, x)
    assert logits.shape == (3, 10)
    assert logits.dtype == jnp.float32
    assert model.apply(variables, x, train=True).shape == (3, 10)


def test_images_without_a_channel_axis_are_named():
    """Was a TypeError about slice limits from inside max pooling (init), or a parameter
    shape error about "28 channels" (apply)."""
    model = SeedCNN()
    variables = model.init(jax.random.key(0), jnp.ones((2, 28, 28, 1)))
    gray = jnp.ones((2, 28, 28))
    message = r"images of shape \(2, 28, 28\): .*NHWC.* add a channel axis, x\[\.\.\., None\]"
    with pytest.raises(ValueError, match=message):
        model.init(jax.random.key(0), gray)
    with pytest.raises(ValueError, match=message):
        model.apply(variables, gray)
    with pytest.raises(ValueError, match="images of shape"):
        ResNet18(num_classes=10, small_images=True).init(jax.random.key(0), jnp.ones((2, 8, 8)))


def test_seed_cnn_param_count():
    # conv1 3*3*1*32+32, conv2 3*3*32*64+64, dense1 1600*128+128, dense2 128*10+10.
    assert 320 + 18_496 + 204_928 + 1_290 == 225_034
    assert _num_params(SeedCNN(), (1, 28, 28, 1)) == 225_034
    variables = nn.meta.unbox(SeedCNN().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
    shapes = jax.tree_util.tree_map(lambda a: a.shape, variables["params"])
    assert shapes["Conv_0"]["kernel"] == (3, 3, 1, 32)
    assert shapes["Conv_1"]["kernel"] == (3, 3, 32, 64)
    assert shapes["Dense_0"]["kernel"] == (1600, 128)
    assert shapes["Dense_1"]["kernel"] == (128, 10)


def test_seed_cnn_bfloat16_logits_are_float32():
    model = SeedCNN(dtype=jnp.bfloat16)
    x = jnp.ones((2, 28, 28, 1))
    variables = model.init(jax.random.key(0), x)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(nn.meta.unbox(variables)))
    logits = model.apply(variables, x)
    assert logits.dtype == jnp.float32
    assert logits.shape == (2, 10)
    assert np.isfinite(np.asarray(logits)).all()


def test_seed_cnn_partition_spec():
    variables = SeedCNN().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    specs = nn.get_partition_spec(variables)["params"]
    assert specs["Conv_0"]["kernel"] == PartitionSpec(None, None, "conv_in", "conv_out")
    assert specs["Conv_0"]["bias"] == PartitionSpec("conv_out")
    assert specs["Dense_0"]["kernel"] == PartitionSpec("embed", "mlp")
    assert specs["Dense_0"]["bias"] == PartitionSpec("mlp")
    assert specs["Dense_1"]["kernel"] == PartitionSpec("mlp", "classes")
    assert specs["Dense_1"]["bias"] == PartitionSpec("classes")


@pytest.mark.reference
def test_seed_cnn_matches_pytorch():
    torch = pytest.importorskip("torch", reason="the parity test needs PyTorch (reference extra)")
    tnn = torch.nn

    model = SeedCNN()
    x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))
    variables = model.init(jax.random.key(0), x)
    params = nn.meta.unbox(variables)["params"]
    # Non-zero biases so that the bias copy is exercised too.
    keys = iter(jax.random.split(jax.random.key(2), 4))
    params = {
        name: {**p, "bias": 0.1 * jax.random.normal(next(keys), p["bias"].shape)}
        for name, p in params.items()
    }
    expected = model.apply({"params": params}, x)

    torch_model = tnn.Sequential(
        tnn.Conv2d(1, 32, 3),
        tnn.ReLU(),
        tnn.MaxPool2d(2),
        tnn.Conv2d(32, 64, 3),
        tnn.ReLU(),
        tnn.MaxPool2d(2),
        tnn.Flatten(),
        tnn.Linear(1600, 128),
        tnn.ReLU(),
        tnn.Linear(128, 10),
    )

    def t(a):
        return torch.from_numpy(np.array(a, dtype=np.float32))

    p = jax.tree_util.tree_map(np.asarray, params)
    # Flax flattens NHWC in (H, W, C) order, PyTorch flattens NCHW in (C, H, W) order: permute
    # the rows of the first dense kernel from (H, W, C) to (C, H, W).
    dense0 = p["Dense_0"]["kernel"].reshape(5, 5, 64, 128).transpose(2, 0, 1, 3).reshape(1600, 128)
    with torch.no_grad():
        torch_model[0].weight.copy_(t(p["Conv_0"]["kernel"].transpose(3, 2, 0, 1)))
        torch_model[0].bias.copy_(t(p["Conv_0"]["bias"]))
        torch_model[3].weight.copy_(t(p["Conv_1"]["kernel"].transpose(3, 2, 0, 1)))
        torch_model[3].bias.copy_(t(p["Conv_1"]["bias"]))
        torch_model[7].weight.copy_(t(dense0.T))
        torch_model[7].bias.copy_(t(p["Dense_0"]["bias"]))
        torch_model[9].weight.copy_(t(p["Dense_1"]["kernel"].T))
        torch_model[9].bias.copy_(t(p["Dense_1"]["bias"]))
        actual = torch_model(t(np.asarray(x).transpose(0, 3, 1, 2))).numpy()

    np.testing.assert_allclose(actual, np.asarray(expected), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- ResNet


def test_resnet50_param_count_matches_torchvision():
    assert _num_params(ResNet50(num_classes=1000), (1, 224, 224, 3)) == 25_557_032


def test_resnet18_param_count_matches_torchvision():
    assert _num_params(ResNet18(num_classes=1000), (1, 224, 224, 3)) == 11_689_512


@pytest.mark.reference
def test_resnet18_param_count_equals_torchvision_model():
    pytest.importorskip("torch", reason="needs PyTorch")
    torchvision = pytest.importorskip("torchvision", reason="needs torchvision")
    expected = sum(p.numel() for p in torchvision.models.resnet18(num_classes=1000).parameters())
    assert _num_params(ResNet18(num_classes=1000), (1, 224, 224, 3)) == expected


def test_resnet18_small_images_output_shape(tiny_variables):
    model = _tiny_resnet(small_images=True)
    x = jnp.ones((2, 32, 32, 3))
    variables = tiny_variables
    assert set(variables) == {"params", "batch_stats"}
    logits = jax.jit(model.apply)(variables, x)
    assert logits.shape == (2, 10)
    assert logits.dtype == jnp.float32


def test_resnet_imagenet_stem_output_shape():
    model = _tiny_resnet()
    x = jnp.ones((2, 64, 64, 3))
    variables = _random_variables(model, x)
    assert variables["params"]["conv_init"]["kernel"].shape == (7, 7, 3, 8)
    # 64 -> 32 (stem conv) -> 16 (max-pool) -> 16, 8, 4, 2 over the stages.
    apply = jax.jit(partial(model.apply, capture_intermediates=True, mutable=["intermediates"]))
    logits, state = apply(variables, x)
    assert logits.shape == (2, 10)
    last_block = state["intermediates"]["ResNetBlock_7"]["__call__"][0]
    assert last_block.shape == (2, 2, 2, 64)


def test_resnet_forward_mode_is_the_transpose_of_reverse_mode():
    """jax.jvp through the whole ImageNet-stem ResNet (max pool included) in eval mode:
    <J t, g> = <t, J^T g> for the input tangent t and the logits' cotangent g."""
    model = _tiny_resnet()
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    variables = _random_variables(model, x)

    def logits(x):
        return model.apply(variables, x)

    t = jax.random.normal(jax.random.key(2), x.shape)
    out, tangent = jax.jit(lambda x, t: jax.jvp(logits, (x,), (t,)))(x, t)
    g = jax.random.normal(jax.random.key(3), out.shape)
    (cotangent,) = jax.jit(lambda x, g: jax.vjp(logits, x)[1](g))(x, g)
    np.testing.assert_allclose(jnp.sum(tangent * g), jnp.sum(t * cotangent), rtol=1e-4)


def test_bottleneck_resnet_output_shape_and_expansion():
    model = ResNet(
        stage_sizes=(1, 1), block_cls=BottleneckResNetBlock, num_classes=5, num_filters=4
    )
    x = jnp.ones((2, 32, 32, 3))
    variables = _random_variables(model, x)
    assert jax.jit(model.apply)(variables, x).shape == (2, 5)
    # Head input is 4x the last stage's width (8 filters * 4).
    assert variables["params"]["Dense_0"]["kernel"].shape == (32, 5)
    # Stride is on the 3x3 conv (v1.5) and the projection shortcut exists in both blocks.
    block = variables["params"]["BottleneckResNetBlock_1"]
    assert block["Conv_1"]["kernel"].shape == (3, 3, 8, 8)
    assert block["conv_proj"]["kernel"].shape == (1, 1, 16, 32)


def test_resnet_last_bn_scale_zero_init_and_partition_specs(tiny_variables):
    variables = jax.eval_shape(
        _tiny_resnet(small_images=True).init, jax.random.key(0), jnp.zeros((1, 16, 16, 3))
    )
    specs = nn.get_partition_spec(variables)["params"]
    block = specs["ResNetBlock_2"]  # first block of stage 2: has a projection
    assert block["Conv_0"]["kernel"] == PartitionSpec(None, None, "conv_in", "conv_out")
    assert block["BatchNorm_1"]["scale"] == PartitionSpec("conv_out")
    assert block["norm_proj"]["bias"] == PartitionSpec("conv_out")
    assert specs["Dense_0"]["kernel"] == PartitionSpec("embed", "classes")
    assert specs["Dense_0"]["bias"] == PartitionSpec("classes")

    params = nn.meta.unbox(tiny_variables)["params"]
    for i in range(8):
        block = params[f"ResNetBlock_{i}"]
        np.testing.assert_array_equal(block["BatchNorm_1"]["scale"], 0.0)
        np.testing.assert_array_equal(block["BatchNorm_0"]["scale"], 1.0)
    assert "conv_proj" not in params["ResNetBlock_0"]
    assert "conv_proj" in params["ResNetBlock_2"]
    assert "bias" not in params["conv_init"]  # convs are bias-free


def test_resnet_bfloat16_logits_are_float32(tiny_variables):
    model = _tiny_resnet(small_images=True, dtype=jnp.bfloat16)
    x = jnp.ones((2, 16, 16, 3))
    abstract = jax.eval_shape(model.init, jax.random.key(0), x)
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(abstract))
    apply = jax.jit(partial(model.apply, train=True, mutable=["batch_stats"]))
    logits, updates = apply(tiny_variables, x)
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    # Running statistics stay in the storage dtype.
    assert all(a.dtype == jnp.float32 for a in jax.tree_util.tree_leaves(updates))


def test_resnet_train_mode_updates_batch_stats(tiny_variables):
    model = _tiny_resnet(small_images=True)
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    variables = tiny_variables
    apply = jax.jit(partial(model.apply, train=True, mutable=["batch_stats"]))
    logits, updates = apply(variables, x)
    assert logits.shape == (4, 10)
    old = jax.tree_util.tree_leaves(variables["batch_stats"])
    new = jax.tree_util.tree_leaves(updates["batch_stats"])
    assert len(old) == len(new) > 0
    assert any(not np.allclose(a, b) for a, b in zip(old, new, strict=True))
    # Eval mode uses the running averages and needs no mutable collection.
    assert jax.jit(model.apply)(variables, x).shape == (4, 10)


def test_resnet_sgd_training_lowers_loss(tiny_variables):
    model = _tiny_resnet(small_images=True)
    x = jax.random.normal(jax.random.key(1), (8, 16, 16, 3))
    y = jax.random.randint(jax.random.key(2), (8,), 0, 10)
    variables = tiny_variables
    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.sgd(0.05, momentum=0.9)
    opt_state = tx.init(params)

    def loss_fn(params, batch_stats):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updates["batch_stats"]

    @jax.jit
    def step(params, batch_stats, opt_state):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    losses = []
    for _ in range(6):
        params, batch_stats, opt_state, loss = step(params, batch_stats, opt_state)
        losses.append(float(loss))
    assert all(np.isfinite(losses))
    assert losses[-1] < losses[0], losses


def test_resnet_train_step_under_fsdp_tp_equals_one_device():
    """Gradients were wrong (the loss right) on a (2, 2, 2) mesh under fsdp_tp: XLA
    partitioned a stride-2 projection over its kernel's two split axes. Each conv now
    gathers its kernel over `fsdp` before use, as FSDP does."""
    from jaxmodels import optim, sharding, training

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (simulated) devices")
    model = ResNet18(num_classes=10, small_images=True, num_filters=4)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.normal(size=(8, 12, 12, 3)).astype(np.float32),
        "label": rng.integers(0, 10, 8).astype(np.int32),
    }

    def one_step(mesh, rules):
        tx = optim.make_optimizer("sgd", 0.1, total_steps=10, momentum=0.0)
        state, shardings = training.create_train_state(
            model, tx, [jnp.zeros((1, 12, 12, 3))], jax.random.key(0), mesh, rules
        )
        loss_fn = training.classification_fns(model)[0]
        step = training.compile_train_step(loss_fn, shardings, mesh, rules)
        state, metrics = step(state, batch)
        return jax.device_get((state.params, metrics["grad_norm"]))

    one = one_step(
        sharding.make_mesh(data=1, devices=jax.devices()[:1]), sharding.logical_rules("data")
    )
    eight = one_step(
        sharding.make_mesh(data=2, fsdp=2, tensor=2), sharding.logical_rules("fsdp_tp")
    )
    np.testing.assert_allclose(eight[1], one[1], rtol=1e-5)  # was 2.036 vs 2.192
    expected = jax.tree_util.tree_leaves_with_path(one[0])
    for (path, a), b in zip(expected, jax.tree.leaves(eight[0]), strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_resnet_batch_norm_uses_global_batch_under_jit_sharding(tiny_variables):
    devices = np.array(jax.devices())
    if devices.size < 2:
        pytest.skip("needs several (simulated) devices")
    mesh = Mesh(devices, ("data",))
    model = _tiny_resnet(small_images=True)
    batch = 2 * devices.size
    x = jax.random.normal(jax.random.key(1), (batch, 8, 8, 3))
    variables = tiny_variables

    def apply(variables, x):
        return model.apply(variables, x, train=True, mutable=["batch_stats"])

    ref_logits, ref_updates = jax.jit(apply)(variables, x)
    x_sharded = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
    variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
    logits, updates = jax.jit(apply)(variables, x_sharded)
    np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(
        jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(ref_updates), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def _torch_resnet(torch, block_cls, stage_sizes, num_filters, num_classes, small_images):
    """A torchvision-style ResNet (v1.5) written out in PyTorch, for parity checks."""
    tnn = torch.nn

    class Basic(tnn.Module):
        expansion = 1

        def __init__(self, inplanes, planes, stride):
            super().__init__()
            self.conv1 = tnn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(planes)
            self.conv2 = tnn.Conv2d(planes, planes, 3, 1, 1, bias=False)
            self.bn2 = tnn.BatchNorm2d(planes)
            self.downsample = None
            if stride != 1 or inplanes != planes:
                self.downsample = tnn.Sequential(
                    tnn.Conv2d(inplanes, planes, 1, stride, bias=False), tnn.BatchNorm2d(planes)
                )

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            identity = x if self.downsample is None else self.downsample(x)
            return torch.relu(out + identity)

    class Bottleneck(tnn.Module):
        expansion = 4

        def __init__(self, inplanes, planes, stride):
            super().__init__()
            out_planes = planes * 4
            self.conv1 = tnn.Conv2d(inplanes, planes, 1, bias=False)
            self.bn1 = tnn.BatchNorm2d(planes)
            self.conv2 = tnn.Conv2d(planes, planes, 3, stride, 1, bias=False)
            self.bn2 = tnn.BatchNorm2d(planes)
            self.conv3 = tnn.Conv2d(planes, out_planes, 1, bias=False)
            self.bn3 = tnn.BatchNorm2d(out_planes)
            self.downsample = None
            if stride != 1 or inplanes != out_planes:
                self.downsample = tnn.Sequential(
                    tnn.Conv2d(inplanes, out_planes, 1, stride, bias=False),
                    tnn.BatchNorm2d(out_planes),
                )

        def forward(self, x):
            out = torch.relu(self.bn1(self.conv1(x)))
            out = torch.relu(self.bn2(self.conv2(out)))
            out = self.bn3(self.conv3(out))
            identity = x if self.downsample is None else self.downsample(x)
            return torch.relu(out + identity)

    block = Basic if block_cls is ResNetBlock else Bottleneck

    class Net(tnn.Module):
        def __init__(self):
            super().__init__()
            if small_images:
                self.conv1 = tnn.Conv2d(3, num_filters, 3, 1, 1, bias=False)
                self.maxpool = tnn.Identity()
            else:
                self.conv1 = tnn.Conv2d(3, num_filters, 7, 2, 3, bias=False)
                self.maxpool = tnn.MaxPool2d(3, 2, 1)
            self.bn1 = tnn.BatchNorm2d(num_filters)
            blocks, inplanes = [], num_filters
            for i, size in enumerate(stage_sizes):
                for j in range(size):
                    planes = num_filters * 2**i
                    blocks.append(block(inplanes, planes, 2 if i > 0 and j == 0 else 1))
                    inplanes = planes * block.expansion
            self.blocks = tnn.Sequential(*blocks)
            self.fc = tnn.Linear(inplanes, num_classes)

        def forward(self, x):
            x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
            x = self.blocks(x).mean(dim=(2, 3))
            return self.fc(x)

    return Net()


def _random_variables(model, x, seed=0):
    """Random (unboxed, float32) variables with the structure of ``model.init``'s.

    Filled with NumPy instead of running ``model.init``: random-normal initialisers are slow to
    compile on CPU, and parity checks want non-trivial BatchNorm scales, biases and statistics
    anyway (the real init zeroes the last BatchNorm scale of every block).
    """
    rng = np.random.default_rng(seed)
    abstract = nn.meta.unbox(jax.eval_shape(model.init, jax.random.key(0), x))

    def fill(path, leaf):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            fan_in = int(np.prod(leaf.shape[:-1]))
            value = rng.normal(size=leaf.shape) / np.sqrt(fan_in)
        elif "scale" in name or "var" in name:
            value = rng.uniform(0.5, 1.5, size=leaf.shape)
        else:  # bias, mean
            value = 0.1 * rng.normal(size=leaf.shape)
        return jnp.asarray(value, dtype=leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _copy_into_torch(torch, torch_model, variables, block_cls):
    p = jax.tree_util.tree_map(np.asarray, variables["params"])
    s = jax.tree_util.tree_map(np.asarray, variables["batch_stats"])

    def t(a):
        return torch.from_numpy(np.array(a, dtype=np.float32))

    def conv(m, kernel):
        m.weight.copy_(t(kernel.transpose(3, 2, 0, 1)))

    def bn(m, params, stats):
        m.weight.copy_(t(params["scale"]))
        m.bias.copy_(t(params["bias"]))
        m.running_mean.copy_(t(stats["mean"]))
        m.running_var.copy_(t(stats["var"]))

    block_name = block_cls.__name__
    with torch.no_grad():
        conv(torch_model.conv1, p["conv_init"]["kernel"])
        bn(torch_model.bn1, p["bn_init"], s["bn_init"])
        for i, tb in enumerate(torch_model.blocks):
            fp, fs = p[f"{block_name}_{i}"], s[f"{block_name}_{i}"]
            n = 2 if block_cls is ResNetBlock else 3
            for k in range(n):
                conv(getattr(tb, f"conv{k + 1}"), fp[f"Conv_{k}"]["kernel"])
                bn(getattr(tb, f"bn{k + 1}"), fp[f"BatchNorm_{k}"], fs[f"BatchNorm_{k}"])
            assert (tb.downsample is None) == ("conv_proj" not in fp)
            if tb.downsample is not None:
                conv(tb.downsample[0], fp["conv_proj"]["kernel"])
                bn(tb.downsample[1], fp["norm_proj"], fs["norm_proj"])
        torch_model.fc.weight.copy_(t(p["Dense_0"]["kernel"].T))
        torch_model.fc.bias.copy_(t(p["Dense_0"]["bias"]))


@pytest.mark.reference
@pytest.mark.parametrize(
    "block_cls,stage_sizes,small_images",
    [
        (ResNetBlock, (2, 2, 2, 2), False),
        (BottleneckResNetBlock, (1, 2, 1), False),
        (ResNetBlock, (1, 1), True),
    ],
)
def test_resnet_matches_pytorch(block_cls, stage_sizes, small_images):
    torch = pytest.importorskip("torch", reason="the parity test needs PyTorch (reference extra)")
    num_filters, num_classes = 8, 7
    model = ResNet(
        stage_sizes=stage_sizes,
        block_cls=block_cls,
        num_classes=num_classes,
        num_filters=num_filters,
        small_images=small_images,
    )
    x = jax.random.normal(jax.random.key(1), (2, 34, 34, 3))  # odd sizes after the stem
    variables = _random_variables(model, x)

    torch_model = _torch_resnet(
        torch, block_cls, stage_sizes, num_filters, num_classes, small_images
    )
    _copy_into_torch(torch, torch_model, variables, block_cls)
    x_torch = torch.from_numpy(np.asarray(x).transpose(0, 3, 1, 2).copy())

    torch_model.eval()
    with torch.no_grad():
        expected_eval = torch_model(x_torch).numpy()
    actual_eval = jax.jit(model.apply)(variables, x)
    np.testing.assert_allclose(actual_eval, expected_eval, atol=1e-4, rtol=1e-4)

    # Training mode normalises with the batch statistics in both frameworks.
    torch_model.train()
    with torch.no_grad():
        expected_train = torch_model(x_torch).numpy()
    torch_stem_mean = torch_model.bn1.running_mean.numpy().copy()  # after one update
    apply = jax.jit(partial(model.apply, train=True, mutable=["batch_stats"]))
    actual_train, _ = apply(variables, x)
    np.testing.assert_allclose(actual_train, expected_train, atol=1e-4, rtol=1e-4)

    # And the input's gradient in training mode (every BatchNorm's backward pass), and the
    # update of the running mean (PyTorch's running variance is the unbiased one; Flax's and
    # ours the biased one).
    w = jax.random.normal(jax.random.key(2), actual_train.shape)
    x_torch.requires_grad_(True)
    (torch_model(x_torch) * torch.from_numpy(np.array(w))).sum().backward()

    def loss(x):
        logits, updates = apply(variables, x)
        return jnp.sum(logits * w), updates

    d_x, updates = jax.jit(jax.grad(loss, has_aux=True))(x)
    np.testing.assert_allclose(
        d_x, x_torch.grad.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-3
    )
    np.testing.assert_allclose(
        updates["batch_stats"]["bn_init"]["mean"], torch_stem_mean, atol=1e-5, rtol=1e-4
    )
