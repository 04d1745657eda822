"""3D 'same' convolutions (cross-correlations) of channels-last volumes, the U-Net's only heavy op.

On a CPU, float32 convolutions with 2^3 and 3^3 kernels run in the project's Winograd kernels
(`_winograd_cpu.cc`, an XLA FFI extension compiled when the package is installed): F(4, k) along
all three axes, each block of tiles transformed, multiplied and transformed back while it stays in
the core's cache; a single input channel (the first layer) is one fused loop of k^3 multiply-adds
per output instead, its kernel gradient one matrix product. Measured on 2 cores (float32,
interleaved in one process): a 3^3 convolution 32 -> 32 channels on 128^3 0.26 s against 1.3 s
for the best XLA rewrite the project had (2D convolutions over the (y, x) planes with Winograd
along z), 48 -> 48 on 64^3 0.054 s against 0.25 s; XLA's own 3D convolution runs at about
35 GFLOP/s where its matmuls reach 175. The published network: a 128^3 block in 1.5-2.0 s against
5.5 s, a training step of 25 x 56^3 patches in 11.9-14.7 s against 39 s (runs of the same code on
this VM vary that much), 12.65 s with the first layer's own convolution (benchmarks/README.md).
Everywhere else (GPU, TPU, float64, other kernel sizes, or an install without a C++ compiler)
`lax.conv_general_dilated` computes the same convolution.

The kernel is transformed (U = G g G^T along each axis) in JAX, so that differentiation sees it;
the extension takes U. The input gradient is a forward convolution with the flipped kernel, the
kernel gradient the extension's second kernel followed by the transposed transform.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_DN_3D = ("NDHWC", "DHWIO", "NDHWC")
# Output tile of the extension's F(m, k) along every axis; its B^T and A^T matrices are compiled
# in and pair with `_winograd_matrices(_TILE, k)` (the tests compare the result with lax's).
_TILE = 4
_KERNEL_SIZES = (2, 3)
# The extension's vectors hold 16 floats: channel counts are padded to a multiple.
_LANES = 16
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


def _load_extension():
    """The extension's FFI targets registered with JAX, or None (with a warning) if it is
    missing."""
    try:
        from . import _winograd_cpu
    except ImportError as error:
        warnings.warn(
            f"cryojax_mw's CPU convolution kernels are not built ({error}); the U-Net falls back "
            "to lax.conv_general_dilated, several times slower on a CPU. Reinstall the package "
            "with a C++ compiler to build them.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    for name, capsule in _winograd_cpu.registrations().items():
        jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    return _winograd_cpu


_EXTENSION = _load_extension()


def _lax_conv(x: jax.Array, kernel: jax.Array, padding: tuple[int, int]) -> jax.Array:
    return lax.conv_general_dilated(x, kernel, (1, 1, 1), [padding] * 3, dimension_numbers=_DN_3D)


def _depth_to_space(y: jax.Array) -> jax.Array:
    """(B, D, H, W, 8 C) with parity p = 4 pz + 2 py + px in channels p * C + c ->
    (B, 2D, 2H, 2W, C)."""
    b, d, h, w, c8 = y.shape
    c = c8 // 8
    y = y.reshape(b, d, h, w, 2, 2, 2, c).transpose(0, 1, 4, 2, 5, 3, 6, 7)
    return y.reshape(b, 2 * d, 2 * h, 2 * w, c)


def _reference(parts, kernel, bias, padding, relu, upsample):
    """The definition of `fused_conv` in lax operations (every platform but the CPU, float64)."""
    x = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
    k = kernel.shape[0]
    y = (jnp.einsum("bdhwi,io->bdhwo", x, kernel[0, 0, 0]) if k == 1
         else _lax_conv(x, kernel, padding))  # fmt: skip
    if upsample:
        y = _depth_to_space(y)
    if bias is not None:
        y = y + bias
    return jax.nn.relu(y) if relu else y


def _transform_kernel(kernel: jax.Array) -> jax.Array:
    """U = G g G^T along each axis, flattened to (alpha^3, Ci, Co)."""
    g = jnp.asarray(_winograd_matrices(_TILE, kernel.shape[0])[1], kernel.dtype)
    u = jnp.einsum("ai,bj,ck,ijkno->abcno", g, g, g, kernel)
    return u.reshape(-1, *kernel.shape[3:])


def _flags(**flags) -> dict:
    return {name: np.int64(value) for name, value in flags.items()}


def _forward_call(inputs, masks, u, bias, out_channels, kernel_size, pad_lo, *, relu,
                  upsampled_in, upsampled_out):  # fmt: skip
    b, d, h, w = inputs[0].shape[:4]
    if upsampled_in:
        d, h, w = d // 2, h // 2, w // 2
    f = 2 if upsampled_out else 1
    shapes = [jax.ShapeDtypeStruct((b, f * d, f * h, f * w, c), jnp.float32) for c in out_channels]
    call = jax.ffi.ffi_call("winograd_forward", shapes, vmap_method="sequential")
    operands = [*inputs, *masks, u, *([] if bias is None else [bias])]
    return call(
        *operands, pad_lo=np.full(3, pad_lo, np.int64),
        **_flags(kernel_size=kernel_size, inputs=len(inputs), outputs=len(out_channels),
                 masked=bool(masks), upsampled_in=upsampled_in, upsampled_out=upsampled_out,
                 has_bias=bias is not None, relu=relu),
    )  # fmt: skip


def _kernel_grad_call(inputs, dy, mask, kernel_size, pad_lo, *, upsampled_dy):
    alpha = _TILE + kernel_size - 1
    ci = sum(x.shape[4] for x in inputs)
    co = dy.shape[4] * (8 if upsampled_dy else 1)
    call = jax.ffi.ffi_call(
        "winograd_weight_grad", jax.ShapeDtypeStruct((alpha**3, ci, co), jnp.float32),
        vmap_method="sequential",
    )  # fmt: skip
    operands = [*inputs, dy, *([] if mask is None else [mask])]
    du = call(*operands, pad_lo=np.full(3, pad_lo, np.int64),
              **_flags(kernel_size=kernel_size, inputs=len(inputs), masked=mask is not None,
                       upsampled_dy=upsampled_dy))  # fmt: skip
    # The transpose of U = G g G^T: dg = G^T dU G along each axis.
    g = jnp.asarray(_winograd_matrices(_TILE, kernel_size)[1], jnp.float32)
    return jnp.einsum("ai,bj,ck,abcno->ijkno", g, g, g, du.reshape(alpha, alpha, alpha, ci, co))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _extension_conv(parts, kernel, bias, padding, relu, upsample):
    return _extension_conv_fwd(parts, kernel, bias, padding, relu, upsample)[0]


def _extension_conv_fwd(parts, kernel, bias, padding, relu, upsample):
    (y,) = _forward_call(
        parts, [], _transform_kernel(kernel), bias,
        [kernel.shape[4] // (8 if upsample else 1)], kernel.shape[0], padding[0], relu=relu,
        upsampled_in=False, upsampled_out=upsample,
    )  # fmt: skip
    return y, (parts, kernel, y if relu else None, bias)


def _extension_conv_bwd(padding, relu, upsample, residuals, dy):
    parts, kernel, y, bias = residuals
    k = kernel.shape[0]
    masks = [] if y is None else [y]
    # dx[j] = sum_t g[t] dz[j - t + pad_lo], dz = dy * (y > 0): the correlation of dz with the
    # flipped kernel, its channels swapped, padded by k - 1 - pad_lo below.
    flipped = jnp.swapaxes(kernel[::-1, ::-1, ::-1], 3, 4)
    dparts = _forward_call(
        [dy], masks, _transform_kernel(flipped), None, [x.shape[4] for x in parts], k,
        k - 1 - padding[0], relu=False, upsampled_in=upsample, upsampled_out=False,
    )  # fmt: skip
    dkernel = _kernel_grad_call(parts, dy, y, k, padding[0], upsampled_dy=upsample)
    dbias = None
    if bias is not None:
        dz = dy if y is None else jnp.where(y > 0, dy, 0.0)
        dbias = dz.sum(axis=(0, 1, 2, 3))
    return tuple(dparts), dkernel, dbias


_extension_conv.defvjp(_extension_conv_fwd, _extension_conv_bwd)


def _pad_channels(a: jax.Array, axis: int, size: int) -> jax.Array:
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, size - a.shape[axis])
    return jnp.pad(a, widths)


def _shifted_copies(x: jax.Array, k: int, padding: tuple[int, int]) -> jax.Array:
    """(k^3, B, D, H, W): x (B, D, H, W) zero-padded and shifted by each kernel offset."""
    padded = jnp.pad(x, [(0, 0), padding, padding, padding])
    d, h, w = x.shape[1:]
    return jnp.stack([padded[:, i : i + d, j : j + h, m : m + w]
                      for i in range(k) for j in range(k) for m in range(k)])  # fmt: skip


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _single_channel_conv(x, kernel, bias, padding, relu):
    return _single_channel_conv_fwd(x, kernel, bias, padding, relu)[0]


def _single_channel_conv_fwd(x, kernel, bias, padding, relu):
    # One fused loop of k^3 multiply-adds per output: padded to 16 channels for the extension,
    # the first layer cost a 16 -> Co convolution.
    k = kernel.shape[0]
    taps = kernel.reshape(k**3, -1)
    y = sum(s[..., None] * taps[t] for t, s in enumerate(_shifted_copies(x[..., 0], k, padding)))
    if bias is not None:
        y = y + bias
    y = jax.nn.relu(y) if relu else y
    return y, (x, kernel, y if relu else None, bias is not None)


def _single_channel_conv_bwd(padding, relu, residuals, dy):
    x, kernel, y, has_bias = residuals
    k = kernel.shape[0]
    dz = dy if y is None else jnp.where(y > 0, dy, 0.0)
    # The kernel's gradient is one matrix product (k^3, voxels) x (voxels, Co); differentiating
    # the fused sum instead reduces dz once per offset, ten times slower.
    dkernel = jnp.einsum("tbdhw,bdhwo->to", _shifted_copies(x[..., 0], k, padding), dz)
    # The input's gradient, the correlation of dz with the flipped kernel (compiled away where
    # unused, as in the U-Net's training).
    flipped = jnp.swapaxes(kernel[::-1, ::-1, ::-1], 3, 4)
    dx = fused_conv([dz], flipped, None, (k - 1 - padding[0], k - 1 - padding[1]))
    return dx, dkernel.reshape(kernel.shape), dz.sum(axis=(0, 1, 2, 3)) if has_bias else None


_single_channel_conv.defvjp(_single_channel_conv_fwd, _single_channel_conv_bwd)


def _on_extension(parts, kernel, bias, padding, relu, upsample):
    """Pads channel counts to multiples of 16 for the extension (zeros in, sliced off after: a
    width of 24) and calls it; a single input channel (the first layer) has its own fused
    convolution."""
    if len(parts) == 1 and parts[0].shape[4] == 1 and not upsample:
        return _single_channel_conv(parts[0], kernel, bias, padding, relu)
    split = np.cumsum([x.shape[4] for x in parts])[:-1]
    rounded = [-(-x.shape[4] // _LANES) * _LANES for x in parts]
    kernel = jnp.concatenate([_pad_channels(kp, 3, n) for kp, n in
                              zip(jnp.split(kernel, split, axis=3), rounded)], axis=3)  # fmt: skip
    parts = tuple(_pad_channels(x, 4, n) for x, n in zip(parts, rounded))
    # Output channels (of each parity when up-sampling) padded the same way.
    co = kernel.shape[4] // (8 if upsample else 1)
    if co % _LANES:
        rounded = co + (-co % _LANES)
        kernel = _pad_channels(kernel.reshape(*kernel.shape[:4], -1, co), 5, rounded)
        kernel = kernel.reshape(*kernel.shape[:4], -1)
        bias = None if bias is None else _pad_channels(bias, 0, rounded)
        return _extension_conv(parts, kernel, bias, padding, relu, upsample)[..., :co]
    return _extension_conv(parts, kernel, bias, padding, relu, upsample)


def fused_conv(
    parts: Sequence[jax.Array],
    kernel: jax.Array,
    bias: jax.Array | None,
    padding: tuple[int, int],
    *,
    relu: bool = False,
    upsample: bool = False,
) -> jax.Array:
    """relu(conv(concatenate(parts), kernel) + bias): a 'same' 3D cross-correlation of the
    channels-last parts (B, D, H, W, C_i), concatenated along channels, by kernel
    (k, k, k, sum C_i, Co) with `padding` (low, high), low + high = k - 1, on every axis.

    With `upsample`, the convolution's Co = 8 C channels are the 8 parities p = 4 pz + 2 py + px
    of each voxel (channels p * C + c) and the result is (B, 2D, 2H, 2W, C) before the bias (C)
    and the ReLU: the U-Net's up-convolution computed at the low resolution.
    """
    parts = tuple(parts)
    k = kernel.shape[0]
    if sum(padding) != k - 1:
        raise ValueError(f"padding {padding} does not keep the size of a {k}^3 convolution")
    arrays = (*parts, kernel, *([] if bias is None else [bias]))
    if (_EXTENSION is None or k not in _KERNEL_SIZES
            or any(a.dtype != jnp.float32 for a in arrays)):  # fmt: skip
        return _reference(parts, kernel, bias, padding, relu, upsample)
    return lax.platform_dependent(
        parts, kernel, bias,
        cpu=lambda *a: _on_extension(*a, padding, relu, upsample),
        default=lambda *a: _reference(*a, padding, relu, upsample),
    )  # fmt: skip
