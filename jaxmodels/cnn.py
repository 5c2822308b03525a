"""Convolutional image classifiers: a small MNIST CNN and the ResNet v1.5 family.

All models take NHWC images and return float32 logits (the softmax lives in the loss), and share
the call signature ``model.apply(variables, x, train=...)``. Every parameter carries logical
sharding names (``conv_in``, ``conv_out``, ``embed``, ``mlp``, ``classes``) via
``nn.with_logical_partitioning``, and the input batch axis is constrained to the logical ``batch``
axis, so the models can be sharded by supplying logical axis rules; without rules the metadata is
inert. Max pooling is `jaxmodels.layers.max_pool` (Flax's numbers, a scatter-free gradient),
batch normalisation `jaxmodels.layers.BatchNorm` (Flax's numbers, one reduction per call in
the backward pass).

Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> model = SeedCNN()
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    >>> model.apply(variables, jnp.zeros((2, 28, 28, 1))).shape
    (2, 10)

    ResNets keep BatchNorm running statistics in the ``batch_stats`` collection; in training
    mode they are returned as mutable state::

        model = ResNet18(num_classes=10, small_images=True)
        variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
        logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxmodels import sharding
from jaxmodels.layers import BatchNorm, max_pool

__all__ = [
    "SeedCNN",
    "ResNetBlock",
    "BottleneckResNetBlock",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet101",
    "ResNet152",
]

Dtype = Any

# Logical axis names of the parameters.
_CONV_KERNEL_AXES = (None, None, "conv_in", "conv_out")
_CHANNEL_AXES = ("conv_out",)

# Kaiming-normal in fan-out mode, as torchvision initialises ResNet convolutions.
_resnet_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _conv_kernel(init_fn: Callable[..., Any] = nn.initializers.lecun_normal()) -> Callable:
    return nn.with_logical_partitioning(init_fn, _CONV_KERNEL_AXES)


def _promoted_kernel_gathered(*args: Any, **kwargs: Any) -> list[Any]:
    """`nn.Conv`'s dtype promotion of (inputs, kernel, bias), then the kernel all-gathered
    over `fsdp` for its use (`sharding.fsdp_gathered`; after the cast, so a bfloat16 step
    gathers half the bytes)."""
    inputs, kernel, *rest = nn.dtypes.promote_dtype(*args, **kwargs)
    return [inputs, sharding.fsdp_gathered(kernel, _CONV_KERNEL_AXES), *rest]


def _channel_param(init_fn: Callable[..., Any]) -> Callable:
    return nn.with_logical_partitioning(init_fn, _CHANNEL_AXES)


def _constrain_batch(x: jnp.ndarray) -> jnp.ndarray:
    """Images [batch, height, width, channels], split over the batch axis."""
    if x.ndim != 4:
        hint = " (grayscale: add a channel axis, x[..., None])" if x.ndim == 3 else ""
        raise ValueError(
            f"images of shape {x.shape}: the image models take [batch, height, width, "
            f"channels] (NHWC){hint}"
        )
    return nn.with_logical_constraint(x, ("batch", None, None, None))


class SeedCNN(nn.Module):
    """The classic small MNIST CNN.

    Conv(32, 3x3, VALID) -> ReLU -> MaxPool(2) -> Conv(64, 3x3, VALID) -> ReLU -> MaxPool(2)
    -> Flatten -> Dense(128) -> ReLU -> Dense(num_classes). 225,034 parameters for 10 classes.

    Attributes:
        num_classes: Number of output classes.
        dtype: Computation dtype.
        param_dtype: Parameter storage dtype.
    """

    num_classes: int = 10
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Computes class logits.

        Args:
            x: <float32>[batch, 28, 28, 1] images.
            train: Unused; accepted so all image models share one signature.

        Returns:
            <float32>[batch, num_classes] logits.
        """
        del train
        x = _constrain_batch(jnp.asarray(x, self.dtype))
        conv = partial(
            nn.Conv,
            kernel_size=(3, 3),
            padding="VALID",
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=_conv_kernel(),
            bias_init=_channel_param(nn.initializers.zeros_init()),
            promote_dtype=_promoted_kernel_gathered,
        )
        x = nn.relu(conv(32)(x))  # [batch, 26, 26, 32]
        x = max_pool(x, (2, 2), strides=(2, 2))  # [batch, 13, 13, 32]
        x = nn.relu(conv(64)(x))  # [batch, 11, 11, 64]
        x = max_pool(x, (2, 2), strides=(2, 2))  # [batch, 5, 5, 64]
        x = x.reshape((x.shape[0], -1))  # [batch, 1600], flattened in (H, W, C) order
        x = nn.Dense(
            128,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "mlp")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)),
        )(x)
        x = nn.relu(x)
        x = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("mlp", "classes")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("classes",)),
        )(x)
        return x.astype(jnp.float32)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _resnet_conv(
    module: nn.Module, features: int, kernel_size: int, strides: int | Sequence[int] = 1, **kwargs
) -> nn.Conv:
    """A bias-free ResNet convolution taking dtypes from ``module``.

    Padding is explicit and symmetric (``kernel_size // 2``), matching torchvision also for
    stride-2 convolutions, where ``"SAME"`` would pad asymmetrically.
    """
    pad = kernel_size // 2
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=_pair(strides),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        kernel_init=_conv_kernel(_resnet_conv_init),
        promote_dtype=_promoted_kernel_gathered,
        **kwargs,
    )


def _batch_norm(module: nn.Module, train: bool, zero_scale: bool = False, **kwargs) -> BatchNorm:
    """A BatchNorm over the batch and spatial axes, configured from ``module``'s fields.

    With ``train=True`` it normalises with the batch statistics and updates the running averages
    in the ``batch_stats`` collection; otherwise it uses the running averages. Under ``jax.jit``
    with the batch sharded over devices, the mean/variance are computed over the GLOBAL batch
    (XLA inserts the cross-device reductions), so the statistics equal the single-device ones.
    Under ``pmap`` each device only sees its shard: set ``axis_name`` to the mapped axis name to
    reduce across devices. It is `jaxmodels.layers.BatchNorm`: Flax's, with a backward pass
    that reduces once per call.
    """
    scale_init = nn.initializers.zeros_init() if zero_scale else nn.initializers.ones_init()
    return BatchNorm(
        use_running_average=not train,
        momentum=module.bn_momentum,
        epsilon=module.bn_epsilon,
        dtype=module.dtype,
        param_dtype=module.param_dtype,
        scale_init=_channel_param(scale_init),
        bias_init=_channel_param(nn.initializers.zeros_init()),
        axis_name=module.axis_name,
        **kwargs,
    )


class ResNetBlock(nn.Module):
    """Basic residual block: two 3x3 convolutions (ResNet-18/34).

    The last BatchNorm scale is zero-initialised so each block starts as the identity. A
    projection shortcut (1x1 conv + BatchNorm) is used when the output shape differs from the
    input's.

    Attributes:
        filters: Output channels.
        strides: Stride of the first 3x3 convolution (and of the projection).
        dtype: Computation dtype.
        param_dtype: Parameter storage dtype.
        bn_momentum: BatchNorm running-average momentum.
        bn_epsilon: BatchNorm epsilon.
        axis_name: BatchNorm cross-device axis for ``pmap`` (not needed under ``jit``).
    """

    filters: int
    strides: int | Sequence[int] = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Applies the block.

        Args:
            x: <dtype>[batch, height, width, in_channels] activations.
            train: Use batch statistics (and update the running ones) if True.

        Returns:
            <dtype>[batch, height / strides, width / strides, filters] activations.
        """
        residual = x
        y = _resnet_conv(self, self.filters, 3, self.strides)(x)
        y = nn.relu(_batch_norm(self, train)(y))
        y = _resnet_conv(self, self.filters, 3)(y)
        y = _batch_norm(self, train, zero_scale=True)(y)
        if residual.shape != y.shape:
            residual = _resnet_conv(self, self.filters, 1, self.strides, name="conv_proj")(residual)
            residual = _batch_norm(self, train, name="norm_proj")(residual)
        return nn.relu(residual + y)


class BottleneckResNetBlock(nn.Module):
    """Bottleneck residual block, v1.5: 1x1 -> 3x3 (strided) -> 1x1 with 4x expansion.

    The last BatchNorm scale is zero-initialised so each block starts as the identity. A
    projection shortcut (1x1 conv + BatchNorm) is used when the output shape differs from the
    input's.

    Attributes:
        filters: Bottleneck width; the block outputs ``4 * filters`` channels.
        strides: Stride of the 3x3 convolution (and of the projection).
        dtype: Computation dtype.
        param_dtype: Parameter storage dtype.
        bn_momentum: BatchNorm running-average momentum.
        bn_epsilon: BatchNorm epsilon.
        axis_name: BatchNorm cross-device axis for ``pmap`` (not needed under ``jit``).
    """

    filters: int
    strides: int | Sequence[int] = 1
    expansion: int = 4
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Applies the block.

        Args:
            x: <dtype>[batch, height, width, in_channels] activations.
            train: Use batch statistics (and update the running ones) if True.

        Returns:
            <dtype>[batch, height / strides, width / strides, 4 * filters] activations.
        """
        residual = x
        y = _resnet_conv(self, self.filters, 1)(x)
        y = nn.relu(_batch_norm(self, train)(y))
        y = _resnet_conv(self, self.filters, 3, self.strides)(y)
        y = nn.relu(_batch_norm(self, train)(y))
        y = _resnet_conv(self, self.filters * self.expansion, 1)(y)
        y = _batch_norm(self, train, zero_scale=True)(y)
        if residual.shape != y.shape:
            residual = _resnet_conv(
                self, self.filters * self.expansion, 1, self.strides, name="conv_proj"
            )(residual)
            residual = _batch_norm(self, train, name="norm_proj")(residual)
        return nn.relu(residual + y)


class ResNet(nn.Module):
    """ResNet v1.5 (stride on the 3x3 convolution), as in torchvision and Flax's ImageNet example.

    Batch normalisation: in training mode (``train=True``) BatchNorm normalises with the batch
    statistics and updates the running averages in the ``batch_stats`` collection (apply with
    ``mutable=["batch_stats"]``); in eval mode it uses the running averages. Under ``jax.jit``
    with the batch sharded over devices, the mean/variance are computed over the GLOBAL batch
    (XLA inserts the cross-device reductions), so the statistics equal the single-device ones.
    Under ``pmap``, pass ``axis_name`` (the mapped axis name) to get the same behaviour.

    Attributes:
        stage_sizes: Number of blocks in each stage; stage ``i`` has ``num_filters * 2**i``
            filters and, for ``i > 0``, downsamples by 2 in its first block.
        block_cls: ``ResNetBlock`` or ``BottleneckResNetBlock``.
        num_classes: Number of output classes.
        num_filters: Filters of the stem and of the first stage.
        small_images: If True, use a CIFAR-style stem (3x3 conv, stride 1, no max-pool);
            otherwise the ImageNet stem (7x7 conv stride 2, BatchNorm, ReLU, 3x3 max-pool
            stride 2).
        dtype: Computation dtype.
        param_dtype: Parameter storage dtype.
        bn_momentum: BatchNorm running-average momentum (Flax convention: the weight of the old
            value; 0.9 equals PyTorch's ``momentum=0.1``).
        bn_epsilon: BatchNorm epsilon.
        axis_name: BatchNorm cross-device axis for ``pmap`` (not needed under ``jit``).
    """

    stage_sizes: Sequence[int]
    block_cls: Callable[..., nn.Module]
    num_classes: int = 1000
    num_filters: int = 64
    small_images: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Computes class logits.

        Args:
            x: <float32>[batch, height, width, channels] images.
            train: Training mode for BatchNorm (batch statistics, running-average updates).

        Returns:
            <float32>[batch, num_classes] logits.
        """
        x = _constrain_batch(jnp.asarray(x, self.dtype))
        if self.small_images:
            x = _resnet_conv(self, self.num_filters, 3, name="conv_init")(x)
            x = nn.relu(_batch_norm(self, train, name="bn_init")(x))
        else:
            x = _resnet_conv(self, self.num_filters, 7, 2, name="conv_init")(x)
            x = nn.relu(_batch_norm(self, train, name="bn_init")(x))
            x = max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                x = self.block_cls(
                    filters=self.num_filters * 2**i,
                    strides=2 if i > 0 and j == 0 else 1,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    bn_momentum=self.bn_momentum,
                    bn_epsilon=self.bn_epsilon,
                    axis_name=self.axis_name,
                )(x, train=train)
        x = jnp.mean(x, axis=(1, 2))  # [batch, channels]
        x = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(
                nn.initializers.lecun_normal(), ("embed", "classes")
            ),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("classes",)),
        )(x)
        return x.astype(jnp.float32)


ResNet18 = partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=ResNetBlock)
ResNet34 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=ResNetBlock)
ResNet50 = partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckResNetBlock)
ResNet101 = partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=BottleneckResNetBlock)
ResNet152 = partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=BottleneckResNetBlock)
