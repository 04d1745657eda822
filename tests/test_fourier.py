"""Fourier masks, the masking operator, data consistency and periodic-plus-smooth."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cryojax_mw.operators import TiltGeometry, TiltProjector
from cryojax_mw.operators._fourier import (
    FourierMaskOperator,
    missing_pyramid_mask,
    missing_wedge_mask,
    periodic_plus_smooth,
    project_observed,
)

SHAPES = [(8, 6), (7, 9), (6, 5, 8), (5, 4, 7)]


def _half(shape):
    return tuple(shape[:-1]) + (shape[-1] // 2 + 1,)


def _neg(a, axes):
    """Index map k -> -k (mod n) along `axes` of a NumPy array."""
    return np.roll(np.flip(a, axis=axes), 1, axis=axes)


def _full_spectrum(half, shape):
    """Hermitian (point-symmetric) extension of a real half-spectrum mask to the full grid."""
    half = np.asarray(half)
    n = shape[-1]
    lead = tuple(range(len(shape) - 1))
    full = np.zeros(shape, half.dtype)
    full[..., : half.shape[-1]] = half
    for j in range(half.shape[-1], n):
        full[..., j] = _neg(half[..., n - j], lead)
    return full


def _masks(shape, dtype):
    """A binary wedge, a soft wedge and a random mask for `shape` (the random one is not
    point-symmetric on the self-conjugate planes)."""
    wedge = missing_wedge_mask(shape, -55, 40, dtype=dtype)
    soft = missing_wedge_mask(shape, -60, 60, soft_edge_deg=15.0, dtype=dtype)
    rand = jnp.asarray(np.random.default_rng(sum(shape)).uniform(-1.0, 2.0, _half(shape)), dtype)
    return {"binary": wedge, "soft": soft, "random": rand}


def _normal(seed, shape, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _dot_test(op, dtype, seed):
    x = _normal(seed, op.shape, dtype)
    y = _normal(seed + 100, op.shape, dtype)
    lhs = jnp.vdot(op.mv(x), y)
    rhs = jnp.vdot(x, op.T.mv(y))
    return float(jnp.abs(lhs - rhs) / jnp.abs(lhs))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["binary", "soft", "random"])
def test_fourier_mask_operator_passes_dot_product_test_float32(shape, kind):
    op = FourierMaskOperator(_masks(shape, jnp.float32)[kind], shape)
    assert _dot_test(op, jnp.float32, 1) <= 1e-5


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["binary", "soft", "random"])
def test_fourier_mask_operator_passes_dot_product_test_float64(shape, kind):
    with jax.enable_x64(True):
        op = FourierMaskOperator(_masks(shape, jnp.float64)[kind], shape, jnp.float64)
        assert _dot_test(op, jnp.float64, 2) <= 1e-12


@pytest.mark.parametrize("shape", SHAPES)
def test_fourier_mask_operator_is_the_full_spectrum_multiplier_of_its_symmetrised_mask(shape):
    """Against complex fftn on the full grid: the stored mask is point-symmetric on the
    self-conjugate planes, equals the given mask elsewhere, and is exactly what is applied."""
    with jax.enable_x64(True):
        raw = np.asarray(_masks(shape, jnp.float64)["random"])
        op = FourierMaskOperator(raw, shape, jnp.float64)
        m = np.asarray(op.mask)
        lead = tuple(range(len(shape) - 1))
        cols = [0] + ([shape[-1] // 2] if shape[-1] % 2 == 0 else [])
        for c in cols:
            np.testing.assert_allclose(m[..., c], 0.5 * (raw[..., c] + _neg(raw[..., c], lead)))
            np.testing.assert_array_equal(m[..., c], _neg(m[..., c], lead))
        inner = [j for j in range(m.shape[-1]) if j not in cols]
        np.testing.assert_array_equal(m[..., inner], raw[..., inner])
        assert not np.allclose(m, raw)  # the random mask really was asymmetric there

        x = np.random.default_rng(0).standard_normal(shape)
        ref = np.fft.ifftn(_full_spectrum(m, shape) * np.fft.fftn(x))
        assert np.max(np.abs(ref.imag)) < 1e-12
        np.testing.assert_allclose(np.asarray(op.mv(jnp.asarray(x))), ref.real, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_binary_mask_operator_is_an_orthogonal_projection(shape):
    with jax.enable_x64(True):
        mask = missing_wedge_mask(shape, -50, 50, dtype=jnp.float64)
        op = FourierMaskOperator(mask, shape, jnp.float64)
        np.testing.assert_array_equal(np.asarray(op.mask), np.asarray(mask))
        x = _normal(3, shape)
        px = op.mv(x)
        assert float(jnp.max(jnp.abs(op.mv(px) - px))) <= 1e-12 * float(jnp.max(jnp.abs(x)))
        assert _dot_test(op, jnp.float64, 4) <= 1e-12
        assert 0.0 < float(jnp.sum(px**2)) < float(jnp.sum(x**2))


def test_fourier_mask_operator_under_jit_vmap_and_in_compositions():
    shape = (6, 5, 8)
    op = FourierMaskOperator(missing_wedge_mask(shape, -60, 60), shape)
    xs = _normal(5, (3,) + shape, jnp.float32)
    batched = jax.jit(jax.vmap(op.mv))(xs)
    for i in range(3):
        np.testing.assert_allclose(batched[i], op.mv(xs[i]), rtol=1e-5, atol=1e-6)
    assert batched.dtype == jnp.float32
    proj = TiltProjector(TiltGeometry.from_range(-60, 60, 20), shape)
    composed = proj @ op
    np.testing.assert_allclose(composed.mv(xs[0]), proj.mv(op.mv(xs[0])), rtol=1e-5, atol=1e-5)
    assert op.in_structure().shape == shape and op.out_structure().shape == shape


@pytest.mark.parametrize("shape", SHAPES)
def test_project_observed_keeps_measured_coefficients_and_is_idempotent(shape):
    with jax.enable_x64(True):
        mask = missing_wedge_mask(shape, -45, 60, dtype=jnp.float64)
        x, y = _normal(6, shape), _normal(60, shape)
        z = project_observed(x, y, mask)
        zf, xf, yf = (np.fft.rfftn(np.asarray(a)) for a in (z, x, y))
        obs = np.asarray(mask) == 1.0
        assert 0 < obs.sum() < obs.size
        np.testing.assert_allclose(zf[obs], yf[obs], atol=1e-12 * np.abs(yf).max())
        np.testing.assert_allclose(zf[~obs], xf[~obs], atol=1e-12 * np.abs(xf).max())
        np.testing.assert_allclose(project_observed(z, y, mask), z, atol=1e-12)


def test_project_observed_blends_coefficients_with_a_soft_mask_and_accepts_batches():
    shape = (9, 8)
    with jax.enable_x64(True):
        mask = missing_wedge_mask(shape, -50, 50, soft_edge_deg=20.0, dtype=jnp.float64)
        m = np.asarray(mask)
        assert np.any((m > 0.01) & (m < 0.99))
        x, y = _normal(7, (2,) + shape), _normal(70, (2,) + shape)
        z = project_observed(x, y, mask)
        for b in range(2):
            xf, yf = np.fft.rfftn(np.asarray(x[b])), np.fft.rfftn(np.asarray(y[b]))
            np.testing.assert_allclose(
                np.fft.rfftn(np.asarray(z[b])), m * yf + (1 - m) * xf, atol=1e-12 * np.abs(yf).max()
            )


def _band_limited_blob(seed, shape):
    """Random volume, band-passed (no very low (kz, kx) frequencies, whose angles the grid
    resolves poorly; no high ones) and windowed to a disc in the (z, x) plane so rays see all
    of it."""
    x = _normal(seed, shape)
    freqs = [np.fft.fftfreq(n) for n in shape[:-1]] + [np.fft.rfftfreq(shape[-1])]
    k = np.meshgrid(*freqs, indexing="ij")
    k2 = sum(kk**2 for kk in k)
    k2_zx = k[0] ** 2 + k[-1] ** 2  # the wedge lives in the (kz, kx) plane
    gain = np.exp(-2 * np.pi**2 * 0.8**2 * k2) * (1 - np.exp(-k2_zx / (2 * 0.08**2)))
    vol = jnp.fft.irfftn(gain * jnp.fft.rfftn(x), s=shape)
    nz, nx = shape[0], shape[-1]
    z, xx = np.arange(nz) - (nz - 1) / 2, np.arange(nx) - (nx - 1) / 2
    r = np.hypot(z[:, None], xx[None, :]) / (min(nz, nx) / 2)
    w = np.cos(np.pi / 2 * np.clip((r - 0.2) / 0.4, 0, 1)) ** 2
    return vol * (w if len(shape) == 2 else w[:, None, :])


def _swapped_wedge(shape, lo, hi):
    """The wrong convention: measured direction (kz, kx) = (cos, sin)(theta), built from scratch."""
    kz = np.fft.fftfreq(shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
    kx = np.fft.rfftfreq(shape[-1])
    phi = np.degrees(np.arctan2(kx, kz))
    phi = np.where(phi > 90, phi - 180, np.where(phi <= -90, phi + 180, phi))
    m = ((phi >= lo) & (phi <= hi)) | ((kz == 0) & (kx == 0))
    return jnp.asarray(np.broadcast_to(m, _half(shape)), jnp.float64)


def _missing_energy_ratio(vol, mask, proj):
    observed = FourierMaskOperator(mask, vol.shape, jnp.float64).mv(vol)
    missing = vol - observed
    return float(jnp.sum(proj.mv(missing) ** 2) / jnp.sum(proj.mv(observed) ** 2))


@pytest.mark.parametrize("shape", [(64, 64), (72, 40), (32, 12, 48)])
def test_wedge_mask_missing_part_is_invisible_to_the_tilt_projector(shape):
    """The convention pin: with the right mask the missing part projects to < 5% of the observed
    part's energy over the tilts; the swapped convention (symmetric range) and the mirrored sign
    (asymmetric range) put measured content in the 'missing' part and fail by a wide margin.
    The shapes avoid grid resonances: on (40, 48) the whole (j, j) diagonal sits at 50.19 deg,
    just outside the range yet seen by the 50-degree tilt, which no binary mask can express."""
    with jax.enable_x64(True):
        vol = _band_limited_blob(11, shape)
        proj = TiltProjector(TiltGeometry.from_range(-50, 50, 2), shape, jnp.float64)
        wedge = missing_wedge_mask(shape, -50, 50, dtype=jnp.float64)
        good = _missing_energy_ratio(vol, wedge, proj)
        swapped = _missing_energy_ratio(vol, _swapped_wedge(shape, -50, 50), proj)
        assert good < 0.05
        assert swapped > 0.5 and swapped > 20 * good

        proj = TiltProjector(TiltGeometry.from_range(-40, 60, 2), shape, jnp.float64)
        wedge = missing_wedge_mask(shape, -40, 60, dtype=jnp.float64)
        good = _missing_energy_ratio(vol, wedge, proj)
        wrong = missing_wedge_mask(shape, -60, 40, dtype=jnp.float64)  # theta -> -theta
        mirrored = _missing_energy_ratio(vol, wrong, proj)
        assert good < 0.05
        assert mirrored > 0.1 and mirrored > 4 * good


def test_wedge_mask_uses_physical_frequencies_on_non_cubic_grids():
    """Closed form: on a (40, 72) grid the coefficient (iz, ix) has direction
    atan2(iz / 40, ix / 72); index-based angles would differ."""
    shape = (40, 72)
    m = np.asarray(missing_wedge_mask(shape, -50, 50))
    # (1, 1): atan(72 / 40) = 60.9 deg -> missing (index angle 45 deg would be observed).
    assert m[1, 1] == 0.0 and m[-1, 1] == 0.0
    # (1, 3): atan(72 / 120) = 31.0 deg -> observed; (2, 3): atan(144 / 120) = 50.2 deg -> missing.
    assert m[1, 3] == 1.0 and m[2, 3] == 0.0 and m[-2, 3] == 0.0
    # Asymmetric (-40, 60): +60.9 deg is missing, (-1, 2) at -42.0 deg missing, (1, 2) at 42.0 kept.
    a = np.asarray(missing_wedge_mask(shape, -40, 60))
    assert a[1, 1] == 0.0 and a[-1, 2] == 0.0 and a[1, 2] == 1.0
    # kz = 0 row is the 0-degree direction: always observed; kx = 0 column (90 deg) missing.
    assert np.all(m[0, :] == 1.0) and np.all(m[1:, 0] == 0.0)


@pytest.mark.parametrize("shape", [(8, 8), (7, 9), (6, 4, 10), (5, 6, 7), (9, 3, 6)])
def test_wedge_mask_observes_dc_and_tilt_axis_and_is_point_symmetric(shape):
    for lo, hi, soft in [(-60, 60, 0.0), (-30, 70, 0.0), (-50, 45, 12.0)]:
        m = np.asarray(missing_wedge_mask(shape, lo, hi, soft_edge_deg=soft))
        assert m.shape == _half(shape) and m.dtype == np.float32
        assert m[(0,) * len(shape)] == 1.0
        if len(shape) == 3:
            assert np.all(m[0, :, 0] == 1.0)  # the ky axis lies in every projection's plane
        assert np.all((m >= 0.0) & (m <= 1.0))
        lead = tuple(range(len(shape) - 1))
        cols = [0] + ([shape[-1] // 2] if shape[-1] % 2 == 0 else [])
        for c in cols:
            np.testing.assert_array_equal(m[..., c], _neg(m[..., c], lead))
        # Symmetrisation leaves the mask alone, so binary masks stay binary in the operator.
        np.testing.assert_array_equal(np.asarray(FourierMaskOperator(m, shape).mask), m)


def test_soft_wedge_mask_follows_the_raised_cosine_in_angle():
    """Against a direct per-coefficient formula: weight = (1 + sin(pi * s / w)) / 2, s the angle
    inside the range (negative outside) clipped to +-w/2, for a symmetric range."""
    shape, hi, w = (33, 31), 50.0, 16.0
    with jax.enable_x64(True):
        m = np.asarray(missing_wedge_mask(shape, -hi, hi, soft_edge_deg=w, dtype=jnp.float64))
    kz = np.fft.fftfreq(shape[0])[:, None]
    kx = np.fft.rfftfreq(shape[1])[None, :]
    s = hi - np.degrees(np.abs(np.arctan2(kz, kx)))
    expected = 0.5 * (1 + np.sin(np.pi * np.clip(s / w, -0.5, 0.5)))
    expected[0, 0] = 1.0
    np.testing.assert_allclose(m, expected, atol=1e-6)
    binary = np.asarray(missing_wedge_mask(shape, -hi, hi))
    far = np.abs(s) > w / 2
    np.testing.assert_array_equal(m[far], binary[far])


def test_pyramid_mask_is_the_union_of_the_two_wedges():
    shape = (10, 8, 12)
    ry, rx = (-50.0, 55.0), (-60.0, 40.0)
    pyr = np.asarray(missing_pyramid_mask(shape, ry, rx))
    wy = np.asarray(missing_wedge_mask(shape, *ry))
    # The series about x is the y-series of the volume with y and x exchanged: build that wedge on
    # (z, x, y), extend it to the full spectrum, swap the axes back and keep the half spectrum.
    swapped_shape = (shape[0], shape[2], shape[1])
    wx_full = _full_spectrum(np.asarray(missing_wedge_mask(swapped_shape, *rx)), swapped_shape)
    wx = np.transpose(wx_full, (0, 2, 1))[..., : shape[2] // 2 + 1]
    np.testing.assert_array_equal(pyr, np.maximum(wy, wx))
    assert np.all(pyr >= wy) and np.all(pyr >= wx)
    assert pyr.sum() > wy.sum() and pyr.sum() > wx.sum()
    assert np.all(pyr[0, 0, :] == 1.0) and np.all(pyr[0, :, 0] == 1.0)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: missing_wedge_mask((8,), -60, 60), "shape must be"),
        (lambda: missing_wedge_mask((2, 3, 4, 5), -60, 60), "shape must be"),
        (lambda: missing_wedge_mask((8, 0), -60, 60), "positive sizes"),
        (lambda: missing_wedge_mask((8, 8), 60, -60), "min 60.0 > max -60.0"),
        (lambda: missing_wedge_mask((8, 8), -90, 60), "strictly between -90 and 90"),
        (lambda: missing_wedge_mask((8, 8), -60, 95), "strictly between -90 and 90"),
        (lambda: missing_wedge_mask((8, 8), -60, float("nan")), "finite"),
        (lambda: missing_wedge_mask((8, 8), -60, 60, soft_edge_deg=-1.0), "soft_edge_deg"),
        (lambda: missing_pyramid_mask((8, 8), (-60, 60), (-60, 60)), r"\(z, y, x\)"),
        (lambda: missing_pyramid_mask((8, 8, 8), (-60, 60, 2), (-60, 60)), "pair"),
        (lambda: missing_pyramid_mask((8, 8, 8), (-60, 60), (70, 60)), "tilt_range_x_deg"),
        (lambda: FourierMaskOperator(jnp.ones((8, 8)), (8, 8)), r"half spectrum \(8, 5\)"),
        (lambda: FourierMaskOperator(jnp.ones((8, 5), jnp.complex64), (8, 8)), "must be real"),
        (lambda: FourierMaskOperator(jnp.ones((8, 5)), (8, 8)).mv(jnp.ones((8, 9))), "expected"),
        (lambda: project_observed(jnp.ones((8, 8)), jnp.ones((8, 7)), jnp.ones((8, 5))), "y has"),
        (lambda: project_observed(jnp.ones((8, 8)), jnp.ones((8, 8)), jnp.ones((8, 8))), "half"),
        (lambda: periodic_plus_smooth(jnp.float32(1.0)), "at least one axis"),
    ],
)
def test_bad_input_raises_a_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def _moisan_2d_numpy(u):
    """Moisan (2011), eq. for the 2D smooth component, written directly with NumPy."""
    M, N = u.shape
    v = np.zeros_like(u)
    v[0, :] += u[-1, :] - u[0, :]
    v[-1, :] += u[0, :] - u[-1, :]
    v[:, 0] += u[:, -1] - u[:, 0]
    v[:, -1] += u[:, 0] - u[:, -1]
    q = np.arange(M)[:, None]
    r = np.arange(N)[None, :]
    den = 2 * np.cos(2 * np.pi * q / M) + 2 * np.cos(2 * np.pi * r / N) - 4
    den[0, 0] = 1.0
    s_hat = np.fft.fft2(v) / den
    s_hat[0, 0] = 0.0
    s = np.real(np.fft.ifft2(s_hat))
    return u - s, s


def _periodic_laplacian(a):
    return sum(np.roll(a, 1, ax) + np.roll(a, -1, ax) - 2 * a for ax in range(a.ndim))


def _boundary_jump_energy(a):
    a = np.asarray(a)
    return sum(np.sum((np.take(a, -1, ax) - np.take(a, 0, ax)) ** 2) for ax in range(a.ndim))


@pytest.mark.parametrize("shape", [(16, 16), (15, 22), (9, 1)])
def test_periodic_plus_smooth_matches_moisans_2d_formula(shape):
    with jax.enable_x64(True):
        u = np.random.default_rng(1).standard_normal(shape) + np.linspace(0, 3, shape[1])
        p, s = periodic_plus_smooth(jnp.asarray(u))
        p_ref, s_ref = _moisan_2d_numpy(u)
        np.testing.assert_allclose(np.asarray(s), s_ref, atol=1e-12)
        np.testing.assert_allclose(np.asarray(p), p_ref, atol=1e-12)


@pytest.mark.parametrize("shape", [(12, 10), (7, 6, 9), (8, 5, 6)])
def test_periodic_plus_smooth_sums_to_input_and_smooth_solves_the_poisson_problem(shape):
    with jax.enable_x64(True):
        rng = np.random.default_rng(2)
        u = rng.standard_normal(shape) + np.arange(shape[-1]) * 0.3
        p, s = (np.asarray(a) for a in periodic_plus_smooth(jnp.asarray(u)))
        np.testing.assert_allclose(p + s, u, atol=1e-12)
        assert abs(s.mean()) < 1e-13
        v = np.zeros_like(u)  # boundary-jump image, built slice by slice
        for ax in range(u.ndim):
            jump = np.take(u, -1, ax) - np.take(u, 0, ax)
            idx0 = [slice(None)] * u.ndim
            idx0[ax] = 0
            idx1 = list(idx0)
            idx1[ax] = -1
            v[tuple(idx0)] += jump
            v[tuple(idx1)] -= jump
        np.testing.assert_allclose(_periodic_laplacian(s), v, atol=1e-11)


@pytest.mark.parametrize("shape", [(17, 24), (9, 10, 13)])
def test_periodic_plus_smooth_leaves_inputs_with_matching_borders_alone(shape):
    """Sums of sinusoids whose first and last samples coincide on every axis (period n - 1):
    the boundary image vanishes, so the smooth part is zero."""
    with jax.enable_x64(True):
        grids = np.meshgrid(*[np.arange(n) / (n - 1) for n in shape], indexing="ij")
        u = np.cos(2 * np.pi * grids[0]) + 0.5 * np.sin(2 * np.pi * 2 * grids[-1])
        u = u + 0.3 * np.cos(2 * np.pi * (grids[0] + 3 * grids[-1])) + 1.7
        assert _boundary_jump_energy(u) < 1e-20
        p, s = periodic_plus_smooth(jnp.asarray(u))
        assert float(jnp.max(jnp.abs(s))) < 1e-12
        np.testing.assert_allclose(np.asarray(p), u, atol=1e-12)


@pytest.mark.parametrize("shape", [(32, 40), (12, 10, 14)])
def test_periodic_part_of_a_ramp_has_much_smaller_border_jumps(shape):
    grids = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    u = sum((a + 1.0) * g for a, g in enumerate(grids)) + 0.1 * grids[0] * grids[-1]
    p, s = periodic_plus_smooth(jnp.asarray(u))
    assert p.dtype == jnp.float32 and s.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(p + s), u, rtol=1e-5, atol=1e-3)
    before, after = _boundary_jump_energy(u), _boundary_jump_energy(p)
    assert after < before / 10.0


def test_periodic_plus_smooth_under_vmap_matches_one_at_a_time():
    u = _normal(9, (3, 6, 5, 7), jnp.float32)
    p, s = jax.vmap(periodic_plus_smooth)(u)
    for i in range(3):
        pi, si = periodic_plus_smooth(u[i])
        np.testing.assert_allclose(p[i], pi, atol=1e-5)
        np.testing.assert_allclose(s[i], si, atol=1e-5)
