"""Properties of the tilt projector and the operator algebra: exact adjoints, autodiff, geometry."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cryojax_mw as cm
from cryojax_mw.operators import _tilt

GEOMETRIES = {
    "even-60": cm.TiltGeometry.from_range(-60, 60, 3),
    "uneven-steep": cm.TiltGeometry([-89.0, -70.0, -45.0, -44.9, -10.0, 0.0, 3.0, 44.9, 45.0, 60.0, 88.0]),
    "asymmetric": cm.TiltGeometry.from_range(-40, 62, 6),
    "dose-symmetric": cm.TiltGeometry([0, 3, -3, -6, 6, 9, -9, -12, 12]),
    "single": cm.TiltGeometry([17.0]),
}


def _operators(dtype):
    ops = {}
    for name, geom in GEOMETRIES.items():
        ops[f"project3d-{name}"] = cm.TiltProjector(geom, (9, 4, 13), dtype)
        ops[f"project2d-{name}"] = cm.TiltProjector(geom, (13, 8), dtype)
    a = cm.TiltProjector(GEOMETRIES["uneven-steep"], (10, 3, 7), dtype)
    ops["backproject"] = a.T
    ops["normal"] = a.T @ a
    ops["sum-scaled"] = 2.5 * a - (-a) + a
    ops["identity"] = cm.IdentityOperator((5, 6), dtype)
    wedge = cm.FourierMaskOperator(cm.missing_wedge_mask((10, 3, 7), -50, 65), (10, 3, 7), dtype)
    ops["fourier-wedge"] = wedge
    ops["wedge-after-backprojection"] = wedge @ a.T
    return ops


def _relative_adjoint_error(op, key):
    k1, k2 = jax.random.split(key)
    # Positive vectors keep the dot product free of cancellation, so rounding is the only error.
    x = jax.random.uniform(k1, op.in_structure().shape, op.in_structure().dtype)
    y = jax.random.uniform(k2, op.out_structure().shape, op.out_structure().dtype)
    lhs = jnp.vdot(op.mv(x), y)
    rhs = jnp.vdot(x, op.T.mv(y))
    return float(jnp.abs(lhs - rhs) / jnp.abs(lhs))


@pytest.mark.parametrize("name", list(_operators(jnp.float32)))
def test_dot_product_adjoint_float32(name):
    op = _operators(jnp.float32)[name]
    assert _relative_adjoint_error(op, jax.random.key(0)) <= 1e-5


@pytest.mark.parametrize("name", list(_operators(jnp.float32)))
def test_dot_product_adjoint_float64(name):
    with jax.enable_x64(True):
        op = _operators(jnp.float64)[name]
        assert _relative_adjoint_error(op, jax.random.key(1)) <= 1e-12


@pytest.mark.parametrize("shape", [(9, 4, 13), (13, 8)])
def test_closed_form_adjoint_equals_autodiff_transpose_of_forward_code(shape):
    """The gather adjoint matches the scatter-add JAX derives from the forward gather code."""
    with jax.enable_x64(True):
        geom = GEOMETRIES["uneven-steep"]
        op = cm.TiltProjector(geom, shape, jnp.float64)
        y = jax.random.normal(jax.random.key(2), op.out_structure().shape, jnp.float64)
        v3 = (shape[0], 1, shape[1]) if len(shape) == 2 else shape
        raw = jax.linear_transpose(
            lambda v: _tilt._project_impl(v, angles_deg=geom.angles_deg),
            jax.ShapeDtypeStruct(v3, jnp.float64),
        )
        expected = raw(y.reshape((geom.n_tilts,) + v3[1:]))[0].reshape(shape)
        np.testing.assert_allclose(op.T.mv(y), expected, rtol=1e-12, atol=1e-12)
        via_jax = jax.linear_transpose(op.mv, jax.ShapeDtypeStruct(shape, jnp.float64))(y)[0]
        np.testing.assert_allclose(via_jax, expected, rtol=1e-12, atol=1e-12)


def test_closed_form_adjoint_matches_autodiff_transpose_at_full_detector_size():
    """At 256^2 a fused einsum form of the adjoint once returned wrong values for a few voxels."""
    geom = cm.TiltGeometry.from_range(-44, 44, 2)
    op = cm.TiltProjector(geom, (256, 256))
    y = jax.random.uniform(jax.random.key(12), op.out_structure().shape)
    raw = jax.linear_transpose(
        lambda v: _tilt._project_impl(v, angles_deg=geom.angles_deg),
        jax.ShapeDtypeStruct((256, 1, 256), jnp.float32),
    )
    expected = raw(y[:, None, :])[0][:, 0, :]
    err = jnp.abs(op.T.mv(y) - expected).max() / jnp.abs(expected).max()
    assert float(err) < 1e-5


def test_gradient_of_least_squares_matches_finite_differences():
    with jax.enable_x64(True):
        op = cm.TiltProjector(GEOMETRIES["even-60"], (8, 3, 10), jnp.float64)
        kx, kb, kd = jax.random.split(jax.random.key(3), 3)
        x = jax.random.normal(kx, op.in_structure().shape, jnp.float64)
        b = jax.random.normal(kb, op.out_structure().shape, jnp.float64)

        def loss(v):
            return 0.5 * jnp.sum((op.mv(v) - b) ** 2)

        g = jax.grad(loss)(x)
        np.testing.assert_allclose(g, op.T.mv(op.mv(x) - b), rtol=1e-12, atol=1e-10)
        for i, d in enumerate(jax.random.normal(kd, (3,) + x.shape, jnp.float64)):
            h = 1e-5
            fd = (loss(x + h * d) - loss(x - h * d)) / (2 * h)
            assert abs(float(fd - jnp.vdot(g, d))) <= 1e-7 * max(1.0, abs(float(fd))), i


def test_forward_mode_and_hessian_vector_products_work():
    with jax.enable_x64(True):
        op = cm.TiltProjector(GEOMETRIES["asymmetric"], (7, 9), jnp.float64)
        x = jax.random.normal(jax.random.key(4), (7, 9), jnp.float64)
        d = jax.random.normal(jax.random.key(5), (7, 9), jnp.float64)
        _, tangent = jax.jvp(op.mv, (x,), (d,))
        np.testing.assert_allclose(tangent, op.mv(d), rtol=1e-12, atol=1e-12)

        def loss(v):
            return 0.5 * jnp.sum(op.mv(v) ** 2)

        hvp = jax.jvp(jax.grad(loss), (x,), (d,))[1]
        np.testing.assert_allclose(hvp, op.T.mv(op.mv(d)), rtol=1e-12, atol=1e-10)


def test_jit_vmap_and_plain_calls_agree():
    op = cm.TiltProjector(GEOMETRIES["even-60"], (12, 5, 16))
    xs = jax.random.normal(jax.random.key(6), (3, 12, 5, 16))
    plain = np.stack([op.mv(x) for x in xs])
    np.testing.assert_allclose(jax.jit(jax.vmap(op.mv))(xs), plain, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.jit(op.mv)(xs[0]), plain[0], rtol=1e-5, atol=1e-5)
    ys = jnp.asarray(plain)
    back = np.stack([op.T.mv(y) for y in ys])
    np.testing.assert_allclose(jax.vmap(op.T.mv)(ys), back, rtol=1e-5, atol=1e-4)
    op2 = cm.TiltProjector(GEOMETRIES["even-60"], (12, 16))
    np.testing.assert_allclose(
        jax.vmap(op2.mv)(xs[:, :, 0, :]), np.stack([op2.mv(x) for x in xs[:, :, 0, :]]), atol=1e-5
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_operators_keep_the_input_dtype_even_with_x64_enabled(dtype):
    with jax.enable_x64(True):
        for name, op in _operators(jnp.float32).items():
            x = jnp.ones(op.in_structure().shape, dtype)
            y = jnp.ones(op.out_structure().shape, dtype)
            assert op.mv(x).dtype == dtype, name
            assert op.T.mv(y).dtype == dtype, name


def test_repeated_calls_do_not_retrace():
    op = cm.TiltProjector(GEOMETRIES["even-60"], (8, 3, 8))

    @jax.jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def normal(operator, x):
        return operator.T.mv(operator.mv(x))

    for seed in range(3):
        normal(op, jax.random.normal(jax.random.key(seed), (8, 3, 8)))
    # A new operator with the same geometry is the same static structure: still one trace.
    normal(cm.TiltProjector(cm.TiltGeometry.from_range(-60, 60, 3), (8, 3, 8)), jnp.ones((8, 3, 8)))


def test_chunking_along_y_gives_the_same_result(monkeypatch):
    op = cm.TiltProjector(GEOMETRIES["uneven-steep"], (10, 23, 12))
    x = jax.random.normal(jax.random.key(7), (10, 23, 12))
    y = jax.random.normal(jax.random.key(8), op.out_structure().shape)
    whole_fwd, whole_adj = op.mv(x), op.T.mv(y)
    # A tiny budget forces chunks of a few y rows and a ragged last chunk.
    monkeypatch.setattr(_tilt, "_CHUNK_ELEMENTS", 3 * GEOMETRIES["uneven-steep"].n_tilts * 12)
    np.testing.assert_allclose(_tilt._project_impl(x, angles_deg=op.geometry.angles_deg), whole_fwd, atol=1e-5)
    np.testing.assert_allclose(
        _tilt._backproject_impl(y, angles_deg=op.geometry.angles_deg, nz=10), whole_adj, atol=1e-5
    )


def _joseph_reference(image, angles_deg):
    """Joseph's forward projection of a 2D (z, x) image, one ray at a time in plain NumPy."""
    nz, nx = image.shape
    zc, xc = np.arange(nz) - (nz - 1) / 2, np.arange(nx) - (nx - 1) / 2

    def sample(line, position):  # linear interpolation, zero outside the line's samples
        i0 = int(np.floor(position))
        f = position - i0
        padded = np.concatenate([[0.0], line, [0.0]])
        if not -1 <= i0 < len(line):
            return 0.0
        return (1 - f) * padded[i0 + 1] + f * padded[i0 + 2]

    out = np.zeros((len(angles_deg), nx))
    for k, a in enumerate(np.deg2rad(angles_deg)):
        c, s = np.cos(a), np.sin(a)
        for j, t in enumerate(xc):
            if abs(c) >= abs(s):  # step along z, interpolate along x
                ray = [sample(image[i], (t - z * s) / c + (nx - 1) / 2) for i, z in enumerate(zc)]
                out[k, j] = sum(ray) / abs(c)
            else:  # step along x, interpolate along z
                ray = [sample(image[:, i], (t - x * c) / s + (nz - 1) / 2) for i, x in enumerate(xc)]
                out[k, j] = sum(ray) / abs(s)
    return out


@pytest.mark.parametrize("shape", [(7, 19), (23, 6)])
def test_forward_matches_a_ray_by_ray_joseph_reference(shape):
    """Including rays that enter or leave through the volume's sides, where the kernels rely on
    zero padding rather than on checks."""
    angles = [-89.0, -70.0, -45.0, -44.9, -10.0, 0.0, 33.0, 45.0, 61.0, 88.0]
    image = np.random.default_rng(3).random(shape)
    with jax.enable_x64(True):
        got = cm.TiltProjector(cm.TiltGeometry(angles), shape, jnp.float64).mv(jnp.asarray(image))
    np.testing.assert_allclose(got, _joseph_reference(image, angles), rtol=1e-12, atol=1e-12)


def test_constant_slab_projects_to_its_path_length():
    """A slab of thickness nz seen at tilt theta is crossed over nz / cos(theta) voxels."""
    nz, nx = 16, 96
    angles = [-50.0, -20.0, 0.0, 35.0]
    op = cm.TiltProjector(cm.TiltGeometry(angles), (nz, 4, nx))
    proj = np.asarray(op.mv(jnp.ones((nz, 4, nx))))
    centre = slice(nx // 2 - 10, nx // 2 + 10)
    for i, a in enumerate(angles):
        length = nz / np.cos(np.deg2rad(a))
        if abs(a) <= 45:  # rays step along z: every slice is crossed exactly once
            np.testing.assert_allclose(proj[i, :, centre], length, rtol=1e-5)
        else:  # rays step along x and cut the slab's faces between samples: exact on average
            assert abs(proj[i, :, centre].mean() - length) < 1e-3 * length
            assert np.abs(proj[i, :, centre] - length).max() < 1.0 / abs(np.sin(np.deg2rad(a)))


@pytest.mark.parametrize("angle", [-63.0, -30.0, 0.0, 12.5, 50.0, 80.0])
def test_a_blob_lands_where_the_geometry_says(angle):
    """A smooth blob at (z, x) projects with its centroid at t* = x cos + z sin and keeps its mass.

    (A single voxel would not: the Joseph hat narrower than a pixel shifts point centroids.)
    """
    nz, nx = 31, 41
    z0, x0 = 4.3, -6.6  # centred coordinates, off the grid
    zc = np.arange(nz)[:, None] - (nz - 1) / 2
    xc = np.arange(nx)[None, :] - (nx - 1) / 2
    vol = np.exp(-((zc - z0) ** 2 + (xc - x0) ** 2) / (2 * 2.5**2))
    proj = np.asarray(cm.TiltProjector(cm.TiltGeometry([angle]), (nz, nx)).mv(jnp.asarray(vol)))[0]
    t = np.arange(nx) - (nx - 1) / 2
    th = np.deg2rad(angle)
    assert abs((proj * t).sum() / proj.sum() - (x0 * np.cos(th) + z0 * np.sin(th))) < 2e-3
    assert abs(proj.sum() - vol.sum()) < 5e-4 * vol.sum()


def test_isotropic_blob_projects_the_same_at_every_angle():
    n = 48
    c = np.arange(n) - (n - 1) / 2
    blob = np.exp(-(c[:, None] ** 2 + c[None, :] ** 2) / (2 * 4.0**2))
    angles = np.linspace(-80, 80, 17)
    proj = np.asarray(cm.TiltProjector(cm.TiltGeometry(angles), (n, n)).mv(jnp.asarray(blob)))
    assert np.max(np.abs(proj - proj[8])) / proj.max() < 0.02


def test_bad_geometry_and_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="between -90 and 90"):
        cm.TiltGeometry([0.0, 90.0])
    with pytest.raises(ValueError, match="finite"):
        cm.TiltGeometry([0.0, float("nan")])
    with pytest.raises(ValueError, match="at least one"):
        cm.TiltGeometry([])
    with pytest.raises(ValueError, match="step"):
        cm.TiltGeometry.from_range(-60, 60, 0)
    with pytest.raises(ValueError, match="empty"):
        cm.TiltGeometry.from_range(60, -60, 2)
    with pytest.raises(ValueError, match="volume_shape"):
        cm.TiltProjector(GEOMETRIES["single"], (4,))
    op = cm.TiltProjector(GEOMETRIES["even-60"], (8, 3, 8))
    with pytest.raises(ValueError, match=r"volume has shape \(8, 8\), expected \(8, 3, 8\)"):
        op.mv(jnp.ones((8, 8)))
    with pytest.raises(ValueError, match="tilt series has shape"):
        op.T.mv(jnp.ones((5, 3, 8)))
    with pytest.raises(ValueError, match="cannot compose"):
        _ = op @ op


def test_from_range_includes_both_ends():
    g = cm.TiltGeometry.from_range(-60, 60, 2)
    assert g.n_tilts == 61 and g.angles_deg[0] == -60.0 and g.angles_deg[-1] == 60.0


def test_operator_norm_matches_largest_singular_value():
    with jax.enable_x64(True):
        op = cm.TiltProjector(GEOMETRIES["asymmetric"], (9, 11), jnp.float64)
        dense = jax.vmap(op.mv)(jnp.eye(99).reshape(99, 9, 11)).reshape(99, -1).T
        expected = np.linalg.svd(np.asarray(dense), compute_uv=False)[0]
        est = cm.operators.operator_norm(jax.random.key(9), op, num_iters=200)
        assert abs(float(est) - expected) / expected < 1e-6


@pytest.mark.slow
def test_512_cubed_volume_with_61_tilts_runs():
    op = cm.TiltProjector(cm.TiltGeometry.from_range(-60, 60, 2), (512, 512, 512))
    out = jax.jit(op.mv)(jnp.ones((512, 512, 512), jnp.float32))
    np.testing.assert_allclose(np.asarray(out[30, 256, 256]), 512.0, rtol=1e-5)
