"""The DeepFinder 3D U-Net (Moebel et al. 2021; thesis ch. 4.2.1) in flax.nnx.

Layout: inputs (batch, z, y, x, channels), channels-last; logits (batch, z, y, x, n_classes).

Convolutions are `_conv.fused_conv` (with their bias and ReLU, the decoder's concatenation and the
up-sampling's reshuffle folded in): the project's Winograd kernels on a CPU, lax's elsewhere.
Up-sampling (nearest x2 followed by a 2^3 'same' convolution, as published) is evaluated at the
low resolution: each of the 8 output parities of the up-sampled grid sees a fixed 2^3 window of
the low-resolution input, so one 2^3 convolution with 8*C_out outputs followed by a depth-to-space
reshuffle gives exactly the same result with the same weights without building the up-sampled
array (4-9% less time for the whole network). Max-pooling is a reshape and a max.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ._conv import fused_conv


def _same_padding(kernel_size: int) -> tuple[int, int]:
    """'same' padding of one axis, as XLA and Keras pad: the extra voxel of even kernels goes
    after."""
    low = (kernel_size - 1) // 2
    return low, kernel_size - 1 - low


def _max_pool2(x: jax.Array) -> jax.Array:
    b, d, h, w, c = x.shape
    return x.reshape(b, d // 2, 2, h // 2, 2, w // 2, 2, c).max(axis=(2, 4, 6))


# _PARITY[p, t, s]: after nearest x2 up-sampling, output parity p of an axis reads the kernel's
# tap s at low-resolution offset t (parity 0: both taps on offset 0; parity 1: tap s on offset s).
_PARITY = (((1.0, 1.0), (0.0, 0.0)), ((1.0, 0.0), (0.0, 1.0)))


# flax's he_normal: a normal truncated at 2 standard deviations, rescaled to variance 2 / fan_in.
_TRUNCATED_STD = 0.87962566103423978


def _he_normal_kernels(key: jax.Array, shapes: Sequence[tuple[int, ...]], dtype) -> list:
    """He-normal kernels (fan-in = all axes but the last), drawn as one flat vector: one small
    compilation per model instead of a slow one per kernel shape (XLA:CPU compiles random draws
    of rank-5 shapes in seconds each)."""
    sizes = [math.prod(shape) for shape in shapes]
    flat = np.asarray(jax.random.truncated_normal(key, -2.0, 2.0, (sum(sizes),), dtype))
    kernels, offset = [], 0
    for shape, size in zip(shapes, sizes):
        std = math.sqrt(2.0 / math.prod(shape[:-1])) / _TRUNCATED_STD
        kernels.append(jnp.asarray(flat[offset : offset + size].reshape(shape) * std, dtype))
        offset += size
    return kernels


class _Conv3d(nnx.Module):
    """k^3 'same' convolution with bias; kernel (k, k, k, Ci, Co) given, bias zero. Called on
    the parts of its input (concatenated along channels), optionally followed by a ReLU."""

    def __init__(self, kernel: jax.Array):
        self.kernel = nnx.Param(kernel)
        self.bias = nnx.Param(jnp.asarray(np.zeros(kernel.shape[-1]), kernel.dtype))
        self.padding = _same_padding(kernel.shape[0])

    def __call__(self, *parts: jax.Array, relu: bool = False) -> jax.Array:
        return fused_conv(parts, self.kernel[...], self.bias[...], self.padding, relu=relu)


class _UpConv3d(_Conv3d):
    """Nearest x2 up-sampling then a 2^3 'same' convolution, computed at the low resolution."""

    def __call__(self, x: jax.Array, *, relu: bool = False) -> jax.Array:
        kernel = self.kernel[...]
        ci, co = kernel.shape[3:]
        parity = jnp.asarray(_PARITY, kernel.dtype)
        # Kernel of output parity (a, b, c) at low-resolution offsets (z, y, x).
        per_parity = jnp.einsum("azd,bye,cxf,defio->zyxiabco", parity, parity, parity, kernel)
        return fused_conv((x,), per_parity.reshape(2, 2, 2, ci, 8 * co), self.bias[...], (0, 1),
                          relu=relu, upsample=True)  # fmt: skip


class DeepFinderUNet(nnx.Module):
    """The DeepFinder 3D U-Net: voxel-wise multi-class segmentation of tomogram patches.

    Published layout (widths (32, 48, 64)): 2 x conv 3^3 (32) -> max-pool 2 -> 2 x conv (48) ->
    max-pool -> 4 x conv (64) -> [up-sample x2 (nearest) + conv 2^3 (64)] -> concatenate the
    48-channel skip -> 2 x conv (48) -> [up-sample + conv 2^3 (48)] -> concatenate the 32-channel
    skip -> 2 x conv (32) -> conv 1^3 (n_classes). Every convolution is 'same'-padded and
    followed by a ReLU except the last, which gives logits (`predict_proba` applies the softmax).
    `len(widths) - 1` poolings; the up-convolution keeps the width of the level below it.
    Kernels are He-normal, biases zero.

    Args:
        n_classes: number of classes including background, >= 2.
        in_channels: channels of the input.
        widths: convolution widths from the top level to the bottom, at least one.
        convs_per_level: 3^3 convolutions per level on each side.
        bottom_convs: 3^3 convolutions at the bottom level.
        param_dtype: dtype of the weights and of the computation (float32 or float64).
        rngs: `nnx.Rngs` for the initial weights (stream `params`).

    Input (batch, z, y, x, in_channels) with z, y, x multiples of `patch_multiple`
    (2 ** (len(widths) - 1)); output logits (batch, z, y, x, n_classes).
    """

    def __init__(
        self,
        n_classes: int,
        *,
        in_channels: int = 1,
        widths: Sequence[int] = (32, 48, 64),
        convs_per_level: int = 2,
        bottom_convs: int = 4,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        widths = tuple(int(w) for w in widths)
        if int(n_classes) < 2:
            raise ValueError(
                f"n_classes counts the background too and must be >= 2, got {n_classes}"
            )
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be one or more positive channel counts, got {widths}")
        for name, value in (("in_channels", in_channels), ("convs_per_level", convs_per_level),
                            ("bottom_convs", bottom_convs)):  # fmt: skip
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if jnp.dtype(param_dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
            raise ValueError(f"param_dtype must be float32 or float64, got {param_dtype}")
        self.n_classes = int(n_classes)
        self.in_channels = int(in_channels)
        self.widths = widths
        self.param_dtype = jnp.dtype(param_dtype)
        self.patch_multiple = 2 ** (len(widths) - 1)

        # Kernel shapes in construction order, drawn at once, then handed out in that order.
        plan, c = [], self.in_channels
        for w in widths[:-1]:
            plan += [(3, c if i == 0 else w, w) for i in range(convs_per_level)]
            c = w
        plan += [(3, c if i == 0 else widths[-1], widths[-1]) for i in range(bottom_convs)]
        c = widths[-1]
        for w in widths[-2::-1]:
            plan.append((2, c, c))
            plan += [(3, c + w if i == 0 else w, w) for i in range(convs_per_level)]
            c = w
        plan.append((1, c, self.n_classes))
        kernels = iter(_he_normal_kernels(
            rngs.params(), [(k, k, k, cin, cout) for k, cin, cout in plan], self.param_dtype
        ))  # fmt: skip

        def stack(n):
            return nnx.List([_Conv3d(next(kernels)) for _ in range(n)])

        self.encoder = nnx.List([stack(convs_per_level) for _ in widths[:-1]])
        self.bottom = stack(bottom_convs)
        ups, decoder = [], []
        for _ in widths[:-1]:
            ups.append(_UpConv3d(next(kernels)))
            decoder.append(stack(convs_per_level))
        self.ups = nnx.List(ups)
        self.decoder = nnx.List(decoder)
        self.head = _Conv3d(next(kernels))

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 5 or x.shape[-1] != self.in_channels:
            raise ValueError(
                f"input must be (batch, z, y, x, {self.in_channels}) channels-last, got shape "
                f"{x.shape}"
            )
        if any(n % self.patch_multiple or n == 0 for n in x.shape[1:4]):
            raise ValueError(
                f"patch sizes must be positive multiples of {self.patch_multiple} "
                f"(2 ** {len(self.widths) - 1} poolings), got {x.shape[1:4]}; crop or pad the "
                "input"
            )

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits (batch, z, y, x, n_classes) of an input (batch, z, y, x, in_channels)."""
        self._check_input(x)
        x = jnp.asarray(x, self.param_dtype)
        skips = []
        for level in self.encoder:
            for layer in level:
                x = layer(x, relu=True)
            skips.append(x)
            x = _max_pool2(x)
        for layer in self.bottom:
            x = layer(x, relu=True)
        for up, level, skip in zip(self.ups, self.decoder, reversed(skips)):
            # The concatenation with the skip happens inside the first convolution's reads.
            x = level[0](up(x, relu=True), skip, relu=True)
            for layer in level[1:]:
                x = layer(x, relu=True)
        return self.head(x)

    def predict_proba(self, x: jax.Array) -> jax.Array:
        """Class probabilities: the softmax of the logits over the last axis."""
        return jax.nn.softmax(self(x), axis=-1)
