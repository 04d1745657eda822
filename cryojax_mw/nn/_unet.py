"""The DeepFinder 3D U-Net (Moebel et al. 2021; thesis ch. 4.2.1) in flax.nnx.

Layout: inputs (batch, z, y, x, channels), channels-last; logits (batch, z, y, x, n_classes).

Speed on XLA:CPU (2 cores, float32). A 3D convolution lowered as one `lax.conv_general_dilated`
was measured 2-3.5 times slower than the same convolution computed as 2D convolutions over the
(y, x) planes (XLA:CPU has fast 2D kernels; the weight gradient of its 3D convolution is
especially slow). `_conv3d` adds Winograd's minimal filtering along z on top, which halves the
arithmetic of a 3^3 convolution. Against the best plane rewrites without it (z-shifts stacked on
the input channels for training, on the output channels for inference), interleaved in one
process: the published network on a 128^3 block 10.9 -> 5.4 s, the gradient of five 56^3 patches
11.4 -> 6.7 s. Winograd over (z, y) with 1D convolutions along x was faster for single layers but
slower for the network (its transformed planes are 2.25 times the input), and over all three axes
with channel matmuls it was slower still.
Up-sampling (nearest x2 followed by a 2^3 'same' convolution, as published) is evaluated at the
low resolution: each of the 8 output parities of the up-sampled grid sees a fixed 2^3 window of
the low-resolution input, so one 2^3 convolution with 8*C_out outputs followed by a depth-to-space
reshuffle gives exactly the same result with the same weights without building the up-sampled
array (4-9% less time for the whole network). Max-pooling is a reshape and a max; bfloat16
convolutions were slower than float32 on this CPU.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

_DN_2D = ("NHWC", "HWIO", "NHWC")


def _same_padding(kernel_size: int) -> tuple[int, int]:
    """'same' padding of one axis, as XLA and Keras pad: the extra voxel of even kernels goes
    after."""
    low = (kernel_size - 1) // 2
    return low, kernel_size - 1 - low


def _conv2d(x: jax.Array, kernel: jax.Array, padding: tuple[int, int]) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (1, 1), (padding, padding), dimension_numbers=_DN_2D)


# Winograd output tile along z: F(4, r) cut the network's CPU time about in half; F(6, 3) measured
# only 3% faster with larger rounding, F(2, 3) and F(3, 3) were slower.
_WINOGRAD_TILE = 4
# Interpolation points of the Toom-Cook construction, in the usual order (small magnitudes first
# keep the transforms well conditioned); infinity is the last point, implicitly.
_TOOM_COOK_POINTS = (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5)


def _winograd_matrices(m: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Winograd minimal filtering F(m, r) for correlation (Lavin & Gray 2016): for d of length
    m + r - 1 and g of length r, y_i = sum_k g_k d_{i+k} equals A^T [(G g) * (B^T d)].

    Toom-Cook: G evaluates g at the points, B^T is the transposed inverse of the Vandermonde
    matrix of the points (the interpolation a linear convolution needs, transposed into a
    correlation), A^T the transposed evaluation of a length-m signal; rows of B^T and G are
    rescaled by the points' products of differences so that B^T holds small integers at F(4, 3).
    Built in float64; m + r - 2 must not exceed the number of points.
    """
    alpha = m + r - 1
    points = np.asarray(_TOOM_COOK_POINTS[: alpha - 1])

    def evaluation(n):  # (alpha, n): polynomial coefficients -> values at the points and infinity
        return np.vstack([points[:, None] ** np.arange(n), np.eye(n)[-1]])

    scale = np.array([np.prod(p - np.delete(points, j)) for j, p in enumerate(points)] + [1.0])
    bt = np.linalg.inv(evaluation(alpha)).T * scale[:, None]
    return bt, evaluation(r) / scale[:, None], evaluation(m).T


def _conv3d(x: jax.Array, kernel: jax.Array, padding: tuple[int, int]) -> jax.Array:
    """3D convolution (cross-correlation) of (B, D, H, W, Ci) by (k, k, k, Ci, Co) with `padding`
    (low, high) on every spatial axis, as 2D convolutions over the (y, x) planes with Winograd's
    F(4, k) along z: every 4 output planes take k + 3 2D convolutions of transformed input planes
    by transformed kernels instead of 4k (half the arithmetic at k = 3). The transforms are exact
    in float64; in float32 the logits and gradients of the network were as close to a float64
    evaluation as those of a direct convolution (2.5e-6 and 3e-4 relative)."""
    k, ci, co = kernel.shape[0], kernel.shape[3], kernel.shape[4]
    if k == 1:
        return jnp.einsum("bdhwi,io->bdhwo", x, kernel[0, 0, 0])
    m = _WINOGRAD_TILE
    bt, g, at = _winograd_matrices(m, k)
    b, d, h, w, _ = x.shape
    tiles = -(-d // m)
    xp = jnp.pad(x, ((0, 0), (padding[0], tiles * m + k - 1 - d - padding[0]), (0, 0), (0, 0),
                     (0, 0)))  # fmt: skip
    # Input plane i of every tile: the planes i, i + m, i + 2m, ... of the padded input.
    planes = [xp[:, i : i + m * tiles : m] for i in range(m + k - 1)]

    def combine(matrix_row, terms):
        return sum(float(c) * t for c, t in zip(matrix_row, terms) if c != 0)

    products = [
        _conv2d(combine(bt_row, planes).reshape(b * tiles, h, w, ci),
                combine(g_row, list(kernel)), padding).reshape(b, tiles, h, w, co)
        for bt_row, g_row in zip(bt, g)
    ]  # fmt: skip
    out = jnp.stack([combine(at_row, products) for at_row in at], axis=2)
    return out.reshape(b, tiles * m, h, w, co)[:, :d]


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

    def __call__(self, x: jax.Array) -> jax.Array:
        return _conv3d(x, self.kernel[...], self.padding) + self.bias[...]


class _UpConv3d(_Conv3d):
    """Nearest x2 up-sampling then a 2^3 'same' convolution, computed at the low resolution."""

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        ci, co = kernel.shape[3:]
        parity = jnp.asarray(_PARITY, kernel.dtype)
        # Kernel of output parity (a, b, c) at low-resolution offsets (z, y, x).
        per_parity = jnp.einsum("azd,bye,cxf,defio->zyxiabco", parity, parity, parity, kernel)
        out = _conv3d(x, per_parity.reshape(2, 2, 2, ci, 8 * co), (0, 1))
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

    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits (batch, z, y, x, n_classes) of an input (batch, z, y, x, in_channels)."""
        self._check_input(x)
        x = jnp.asarray(x, self.param_dtype)
        skips = []
        for level in self.encoder:
            for layer in level:
                x = jax.nn.relu(layer(x))
            skips.append(x)
            x = _max_pool2(x)
        for layer in self.bottom:
            x = jax.nn.relu(layer(x))
        for up, level, skip in zip(self.ups, self.decoder, reversed(skips)):
            x = jnp.concatenate([jax.nn.relu(up(x)), skip], axis=-1)
            for layer in level:
                x = jax.nn.relu(layer(x))
        return self.head(x)

    def predict_proba(self, x: jax.Array) -> jax.Array:
        """Class probabilities: the softmax of the logits over the last axis."""
        return jax.nn.softmax(self(x), axis=-1)
