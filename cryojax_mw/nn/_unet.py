"""The DeepFinder 3D U-Net (Moebel et al. 2021; thesis ch. 4.2.1) in flax.nnx.

Layout: inputs (batch, z, y, x, channels), channels-last; logits (batch, z, y, x, n_classes).

Speed on XLA:CPU (CPU time on 2 cores, float32). A 3D convolution lowered as one
`lax.conv_general_dilated` was measured 2-3.5 times slower than the same convolution computed as
2D convolutions over the (y, x) planes (XLA:CPU has fast 2D kernels; the weight gradient of its 3D
convolution is especially slow). Two exact rewrites are used:
- `_conv3d` (training, differentiated by JAX): the k shifts along z are stacked on the channel
  axis, so one 2D convolution with k*C_in input channels does the whole 3D convolution; its
  automatic gradient was the fastest tried (versus custom VJPs mixing the rewrites, per-shift 2D
  convolutions, and shifts folded into the output channels).
- `_conv3d_forward` (inference): one 2D convolution whose k*C_out outputs are the z-shifts'
  partial sums, added after shifting; 15-20% faster than `_conv3d` for the whole network.
Up-sampling (nearest x2 followed by a 2^3 'same' convolution, as published) is evaluated at the
low resolution: each of the 8 output parities of the up-sampled grid sees a fixed 2^3 window of
the low-resolution input, so one 2^3 convolution with 8*C_out outputs followed by a depth-to-space
reshuffle gives exactly the same result with the same weights without building the up-sampled
array (4-9% less time for the whole network). Max-pooling is a reshape and a max; bfloat16
convolutions were slower than float32 on this CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

_DN_2D = ("NHWC", "HWIO", "NHWC")
# Below this many input channels a convolution stacks its z-shifts on the input side in both
# paths (the output-side rewrite wastes a 2D convolution on very thin inputs).
_THIN_INPUT = 8

Conv = Callable[[jax.Array, jax.Array, tuple[int, int]], jax.Array]


def _same_padding(kernel_size: int) -> tuple[int, int]:
    """'same' padding of one axis, as XLA and Keras pad: the extra voxel of even kernels goes
    after."""
    low = (kernel_size - 1) // 2
    return low, kernel_size - 1 - low


def _conv2d(x: jax.Array, kernel: jax.Array, padding: tuple[int, int]) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (1, 1), (padding, padding), dimension_numbers=_DN_2D)


def _pointwise(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jnp.einsum("bdhwi,io->bdhwo", x, kernel[0, 0, 0])


def _conv3d(x: jax.Array, kernel: jax.Array, padding: tuple[int, int]) -> jax.Array:
    """3D convolution (cross-correlation) of (B, D, H, W, Ci) by (k, k, k, Ci, Co) with `padding`
    (low, high) on every spatial axis; z-shifts stacked on the input channels."""
    k, ci, co = kernel.shape[0], kernel.shape[3], kernel.shape[4]
    if k == 1:
        return _pointwise(x, kernel)
    b, d, h, w, _ = x.shape
    xp = jnp.pad(x, ((0, 0), padding, (0, 0), (0, 0), (0, 0)))
    shifted = jnp.concatenate([xp[:, a : a + d] for a in range(k)], axis=-1)
    kernel_2d = jnp.moveaxis(kernel, 0, 2).reshape(k, k, k * ci, co)
    out = _conv2d(shifted.reshape(b * d, h, w, k * ci), kernel_2d, padding)
    return out.reshape(b, d, h, w, co)


def _conv3d_forward(x: jax.Array, kernel: jax.Array, padding: tuple[int, int]) -> jax.Array:
    """The same convolution as `_conv3d`, faster without a gradient: z-shifts on the outputs."""
    k, ci, co = kernel.shape[0], kernel.shape[3], kernel.shape[4]
    if k == 1:
        return _pointwise(x, kernel)
    if ci < _THIN_INPUT:
        return _conv3d(x, kernel, padding)
    b, d, h, w, _ = x.shape
    kernel_2d = jnp.moveaxis(kernel, 0, 3).reshape(k, k, ci, k * co)
    partial = _conv2d(x.reshape(b * d, h, w, ci), kernel_2d, padding).reshape(b, d, h, w, k, co)
    # out[z] = sum_a partial_a[z + a - low]: pad z like the input would have been.
    partial = jnp.pad(partial, ((0, 0), padding, (0, 0), (0, 0), (0, 0), (0, 0)))
    return sum(partial[:, a : a + d, :, :, a] for a in range(k))


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
    """k^3 'same' convolution with bias; kernel (k, k, k, Ci, Co) given, bias zero."""

    def __init__(self, kernel: jax.Array):
        self.kernel = nnx.Param(kernel)
        self.bias = nnx.Param(jnp.asarray(np.zeros(kernel.shape[-1]), kernel.dtype))
        self.padding = _same_padding(kernel.shape[0])

    def __call__(self, x: jax.Array, conv: Conv) -> jax.Array:
        return conv(x, self.kernel[...], self.padding) + self.bias[...]


class _UpConv3d(_Conv3d):
    """Nearest x2 up-sampling then a 2^3 'same' convolution, computed at the low resolution."""

    def __call__(self, x: jax.Array, conv: Conv) -> jax.Array:
        kernel = self.kernel[...]
        ci, co = kernel.shape[3:]
        parity = jnp.asarray(_PARITY, kernel.dtype)
        # Kernel of output parity (a, b, c) at low-resolution offsets (z, y, x).
        per_parity = jnp.einsum("azd,bye,cxf,defio->zyxiabco", parity, parity, parity, kernel)
        out = conv(x, per_parity.reshape(2, 2, 2, ci, 8 * co), (0, 1))
        b, d, h, w, _ = x.shape
        out = out.reshape(b, d, h, w, 2, 2, 2, co).transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return out.reshape(b, 2 * d, 2 * h, 2 * w, co) + self.bias[...]


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

    def _logits(self, x: jax.Array, conv: Conv) -> jax.Array:
        self._check_input(x)
        x = jnp.asarray(x, self.param_dtype)
        skips = []
        for level in self.encoder:
            for layer in level:
                x = jax.nn.relu(layer(x, conv))
            skips.append(x)
            x = _max_pool2(x)
        for layer in self.bottom:
            x = jax.nn.relu(layer(x, conv))
        for up, level, skip in zip(self.ups, self.decoder, reversed(skips)):
            x = jnp.concatenate([jax.nn.relu(up(x, conv)), skip], axis=-1)
            for layer in level:
                x = jax.nn.relu(layer(x, conv))
        return self.head(x, conv)

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits (batch, z, y, x, n_classes) of an input (batch, z, y, x, in_channels)."""
        return self._logits(x, _conv3d)

    def predict_proba(self, x: jax.Array) -> jax.Array:
        """Class probabilities (softmax over the last axis), computed with the inference-optimised
        convolutions (equal to `softmax(model(x))` up to float rounding)."""
        return jax.nn.softmax(self._logits(x, _conv3d_forward), axis=-1)
