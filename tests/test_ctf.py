"""The contrast transfer function: wavelength, CTF values, the CTF operator and phase flipping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cryojax_mw.operators import CTFOperator, ctf_2d, electron_wavelength, phase_flip


def _normal(seed, shape, dtype=jnp.float64):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _signed_index(n):
    """Integer frequency index of each FFT bin, k in [-n/2, n/2)."""
    j = np.arange(n)
    return np.where(j < (n + 1) // 2, j, j - n)


def _reference_ctf(shape, pixel, defocus_um, *, kv=300.0, cs_mm=2.7, amp=0.07, phase=0.0, b=0.0):
    """The CTF on the full FFT grid of `shape`, written directly from the textbook formula with
    NumPy in float64 (only the wavelength is taken from the package, tested on its own)."""
    with jax.enable_x64(True):
        lam = float(electron_wavelength(np.float64(kv)))
    ky = _signed_index(shape[0])[:, None] / (shape[0] * pixel)
    kx = _signed_index(shape[1])[None, :] / (shape[1] * pixel)
    k2 = ky**2 + kx**2
    dz = np.asarray(defocus_um, np.float64)[..., None, None] * 1e4
    chi = np.pi * lam * dz * k2 - 0.5 * np.pi * (cs_mm * 1e7) * lam**3 * k2**2 + np.radians(phase)
    return (np.sqrt(1 - amp**2) * np.sin(chi) + amp * np.cos(chi)) * np.exp(-b * k2 / 4)


def _filter_full(x, ctf_full):
    """Filter real images by a full-grid multiplier with the complex FFT (independent of rfft2)."""
    out = np.fft.ifft2(np.fft.fft2(np.asarray(x, np.float64)) * ctf_full)
    assert np.max(np.abs(out.imag)) < 1e-12 * max(1.0, np.max(np.abs(out.real)))
    return out.real


def test_electron_wavelength_matches_tabulated_values():
    np.testing.assert_allclose(float(electron_wavelength(300.0)), 0.019687, atol=1e-6)
    np.testing.assert_allclose(float(electron_wavelength(200.0)), 0.025079, atol=1e-6)
    np.testing.assert_allclose(float(electron_wavelength(100.0)), 0.037014, atol=1e-6)
    # The engineering form 12.26426 / sqrt(V (1 + V / (2 * 510998.95))), V in volts and the
    # electron rest energy in eV; a non-relativistic wavelength would be 14 % off at 300 kV.
    with jax.enable_x64(True):
        kv = np.array([80.0, 120.0, 200.0, 300.0])
        v = kv * 1e3
        expected = 12.26426 / np.sqrt(v * (1 + v / (2 * 510998.95)))
        np.testing.assert_allclose(np.asarray(electron_wavelength(kv)), expected, rtol=1e-6)


@pytest.mark.parametrize("amp", [0.0, 0.07, 0.3])
def test_ctf_at_zero_frequency_equals_amplitude_contrast(amp):
    c = ctf_2d((12, 10), 1.3, jnp.array([0.5, 2.0, 4.0]), amplitude_contrast=amp, b_factor=80.0)
    np.testing.assert_allclose(np.asarray(c[:, 0, 0]), amp, rtol=1e-6, atol=1e-7)


def _first_zero(values, freqs):
    """Frequency of the first sign change of `values` after DC (positive at freqs[1]), by
    linear interpolation between the two grid points around it."""
    j = 1 + int(np.argmax(values[1:] <= 0))
    assert j > 1 and np.all(values[1:j] > 0)
    f0, f1, v0, v1 = freqs[j - 1], freqs[j], values[j - 1], values[j]
    return f0 + (f1 - f0) * v0 / (v0 - v1)


def test_first_zero_without_cs_and_amplitude_contrast_is_at_inverse_sqrt_lambda_dz():
    pixel, dz_um, n = 1.0, 1.2, 8192
    with jax.enable_x64(True):
        c = np.asarray(ctf_2d((n, n // 64), pixel, dz_um, cs_mm=0.0, amplitude_contrast=0.0))
        lam = float(electron_wavelength(300.0))
    k0 = 1.0 / np.sqrt(lam * dz_um * 1e4)
    freqs = np.fft.rfftfreq(n, pixel)
    # Along ky (column kx = 0) on a fine grid of spacing 1 / (n * pixel).
    np.testing.assert_allclose(_first_zero(c[: n // 2 + 1, 0], freqs), k0, rtol=1e-5)


def test_first_zero_with_cs_and_amplitude_contrast_solves_the_quadratic_in_k2():
    pixel, dz_um, cs_mm, amp, n = 1.0, 0.5, 2.7, 0.1, 4096
    with jax.enable_x64(True):
        c = np.asarray(ctf_2d((4, n), pixel, dz_um, cs_mm=cs_mm, amplitude_contrast=amp))
        lam = float(electron_wavelength(300.0))
    # CTF = sin(chi + asin(A)) vanishes first where chi = pi - asin(A), a quadratic in u = k^2:
    # (pi/2) Cs lam^3 u^2 - pi lam dz u + (pi - asin(A)) = 0, smaller root.
    a = 0.5 * np.pi * cs_mm * 1e7 * lam**3
    b = np.pi * lam * dz_um * 1e4
    u = (b - np.sqrt(b**2 - 4 * a * (np.pi - np.arcsin(amp)))) / (2 * a)
    np.testing.assert_allclose(_first_zero(c[0], np.fft.rfftfreq(n, pixel)), np.sqrt(u), rtol=1e-5)


def test_ctf_depends_only_on_frequency_magnitude():
    n = 16
    c = np.asarray(ctf_2d((n, n), 2.1, 1.7, b_factor=30.0, phase_shift_deg=20.0))
    m = n // 2 + 1
    # (ky, kx) -> (kx, ky) on the non-negative quadrant, and ky -> -ky.
    np.testing.assert_array_equal(c[:m, :m], c[:m, :m].T)
    np.testing.assert_array_equal(c[1:], c[1:][::-1])


@pytest.mark.parametrize("shape", [(10, 13), (9, 8)])
def test_ctf_matches_a_direct_numpy_formula(shape):
    params = {"kv": 200.0, "cs_mm": 2.0, "amp": 0.1, "phase": 35.0, "b": 50.0}
    dz = np.array([0.8, 2.5, 4.0])
    with jax.enable_x64(True):
        c = ctf_2d(
            shape,
            0.9,
            jnp.asarray(dz),
            voltage_kv=200.0,
            cs_mm=2.0,
            amplitude_contrast=0.1,
            phase_shift_deg=35.0,
            b_factor=50.0,
        )
        assert c.dtype == jnp.float64
    ref = _reference_ctf(shape, 0.9, dz, **params)[..., : shape[1] // 2 + 1]
    np.testing.assert_allclose(np.asarray(c), ref, rtol=0, atol=1e-11)


def test_per_tilt_defocus_gives_one_ctf_per_tilt_equal_to_the_scalar_calls():
    dz = [1.0, 2.5, 3.25, 5.0]
    c = ctf_2d((8, 11), 1.5, jnp.asarray(dz), cs_mm=2.0, b_factor=20.0)
    assert c.shape == (4, 8, 6)
    for i, d in enumerate(dz):
        np.testing.assert_array_equal(
            np.asarray(c[i]), np.asarray(ctf_2d((8, 11), 1.5, d, cs_mm=2.0, b_factor=20.0))
        )


def _tilt_ctfs(image_shape, dtype):
    return ctf_2d(image_shape, 4.0, jnp.asarray([1.0, 2.0, 3.5], dtype), b_factor=40.0)


@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-12), (jnp.float32, 1e-5)])
@pytest.mark.parametrize("image_shape", [(8, 9), (8, 10)])
@pytest.mark.parametrize("kind", ["ctf_2d", "random"])
def test_ctf_operator_passes_the_dot_product_adjoint_test(dtype, tol, image_shape, kind):
    with jax.enable_x64(dtype == jnp.float64):
        if kind == "ctf_2d":
            ctf = _tilt_ctfs(image_shape, dtype)
        else:
            # Not even on the self-conjugate columns: the operator must still be self-adjoint.
            ctf = _normal(7, (3, image_shape[0], image_shape[1] // 2 + 1), dtype)
        op = CTFOperator(ctf, image_shape)
        assert op.in_structure().shape == op.out_structure().shape == (3,) + image_shape
        worst = 0.0
        for seed in range(5):
            x = _normal(seed, op.shape, dtype)
            # The A x term keeps <A x, y> away from 0, where a relative error means nothing.
            y = _normal(seed + 50, op.shape, dtype) + op.mv(x)
            # Inner products summed in float64, so only the operator's rounding is measured.
            lhs = np.vdot(np.float64(op.mv(x)), np.float64(y))
            rhs = np.vdot(np.float64(x), np.float64(op.T.mv(y)))
            worst = max(worst, abs(lhs - rhs) / abs(lhs))
        assert op.T is op
    assert worst <= tol


@pytest.mark.parametrize("image_shape", [(8, 9), (10, 8)])
def test_ctf_operator_equals_complex_fft_filtering_with_the_full_grid_ctf(image_shape):
    dz = np.array([1.0, 2.0, 3.5])
    with jax.enable_x64(True):
        op = CTFOperator(_tilt_ctfs(image_shape, jnp.float64), image_shape)
        x = _normal(3, op.shape)
        got = np.asarray(op.mv(x))
    expected = _filter_full(x, _reference_ctf(image_shape, 4.0, dz, b=40.0))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_uneven_ctf_is_symmetrised_to_the_multiplier_that_acts_on_real_images():
    shape = (8, 10)  # even x: both kx = 0 and the Nyquist column are self-conjugate
    with jax.enable_x64(True):
        raw = np.asarray(_normal(8, (3, 8, 6)))
        op = CTFOperator(raw, shape)
        x = _normal(9, op.shape)
        got = np.asarray(op.mv(x))
    stored = np.asarray(op.ctf)

    def negate_ky(a):
        """Index map ky -> -ky (mod n_y) along axis -2."""
        return np.roll(np.flip(a, axis=-2), 1, axis=-2)

    for col in (0, 5):
        expected = 0.5 * (raw[..., col] + negate_ky(raw)[..., col])
        np.testing.assert_allclose(stored[..., col], expected, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(stored[..., 1:5], raw[..., 1:5])
    # Hermitian extension to the full grid: columns kx = -4..-1 hold c(-ky, 4..1).
    full = np.concatenate([stored, negate_ky(stored[..., 4:0:-1])], axis=-1)
    np.testing.assert_allclose(got, _filter_full(x, full), rtol=0, atol=1e-12)


def test_single_ctf_acts_on_every_tilt_and_per_tilt_ctf_sets_the_batch_shape():
    with jax.enable_x64(True):
        single = ctf_2d((8, 9), 3.0, 2.0)
        x = _normal(1, (4, 8, 9))
        op = CTFOperator(single, (4, 8, 9))
        stacked = jnp.stack([CTFOperator(single, (8, 9)).mv(xi) for xi in x])
        np.testing.assert_allclose(np.asarray(op.mv(x)), np.asarray(stacked), atol=1e-14)
        per_tilt = _tilt_ctfs((8, 9), jnp.float64)
        assert CTFOperator(per_tilt, (8, 9)).in_structure().shape == (3, 8, 9)
        assert CTFOperator(per_tilt, (8, 9)).in_structure().dtype == jnp.float64


def test_phase_flip_after_the_ctf_equals_filtering_with_its_absolute_value():
    image_shape, dz = (10, 9), np.array([1.0, 2.0, 3.5])
    with jax.enable_x64(True):
        ctf = _tilt_ctfs(image_shape, jnp.float64)
        x = _normal(4, (3,) + image_shape)
        got = np.asarray(phase_flip(CTFOperator(ctf, image_shape).mv(x), ctf))
    expected = _filter_full(x, np.abs(_reference_ctf(image_shape, 4.0, dz, b=40.0)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_phase_flip_is_an_involution_and_keeps_images_where_the_ctf_is_zero():
    with jax.enable_x64(True):
        ctf = _tilt_ctfs((8, 8), jnp.float64)
        x = _normal(5, (3, 8, 8))
        np.testing.assert_allclose(
            np.asarray(phase_flip(phase_flip(x, ctf), ctf)), np.asarray(x), atol=1e-13
        )
        # sign(0) is taken as +1: a zero ctf leaves the images unchanged.
        np.testing.assert_allclose(
            np.asarray(phase_flip(x, jnp.zeros((8, 5)))), np.asarray(x), atol=1e-13
        )


def test_jit_vmap_and_grad_agree_with_plain_calls_and_closed_forms():
    shape, dz = (8, 9), jnp.asarray([1.0, 2.0, 3.5])
    plain = ctf_2d(shape, 2.0, dz)
    jitted = jax.jit(lambda d: ctf_2d(shape, 2.0, d))(dz)
    mapped = jax.vmap(lambda d: ctf_2d(shape, 2.0, d))(dz)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(plain), atol=1e-6)
    np.testing.assert_allclose(np.asarray(mapped), np.asarray(plain), atol=1e-6)

    op = CTFOperator(plain, shape)
    x = _normal(2, (5, 3) + shape, jnp.float32)
    # The operator is a pytree: it passes through jit as an argument.
    jitted_mv = jax.jit(lambda o, xi: o.mv(xi))(op, x[0])
    np.testing.assert_allclose(np.asarray(jitted_mv), np.asarray(op.mv(x[0])), atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(jax.vmap(op.mv)(x)), np.stack([np.asarray(op.mv(xi)) for xi in x]), atol=1e-5
    )
    flipped = jax.jit(phase_flip)(x[0], plain)
    np.testing.assert_allclose(np.asarray(flipped), np.asarray(phase_flip(x[0], plain)), atol=1e-5)
    # It can also be built inside jit from a traced defocus.
    built = jax.jit(lambda d, xi: CTFOperator(ctf_2d(shape, 2.0, d), shape).mv(xi))(dz, x[0])
    np.testing.assert_allclose(np.asarray(built), np.asarray(op.mv(x[0])), atol=1e-5)

    # d CTF / d dz = cos(chi + asin A) * pi lam k^2 * 1e4 per micrometre, times the envelope.
    with jax.enable_x64(True):
        d0 = jnp.asarray(1.7)
        grad = jax.grad(lambda d: jnp.sum(ctf_2d(shape, 2.0, d, b_factor=10.0)))(d0)
        lam = float(electron_wavelength(300.0))
        ky = _signed_index(8)[:, None] / (8 * 2.0)
        kx = np.fft.rfftfreq(9, 2.0)[None, :]
        k2 = ky**2 + kx**2
        chi = np.pi * lam * 1.7e4 * k2 - 0.5 * np.pi * 2.7e7 * lam**3 * k2**2
        expected = np.sum(
            np.cos(chi + np.arcsin(0.07)) * np.pi * lam * k2 * 1e4 * np.exp(-10.0 * k2 / 4)
        )
        np.testing.assert_allclose(float(grad), expected, rtol=1e-10)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_dtype_is_kept_under_x64(dtype):
    with jax.enable_x64(True):
        ctf = ctf_2d((8, 9), 2.0, jnp.asarray([1.0, 2.0], dtype))
        assert ctf.dtype == dtype
        assert electron_wavelength(jnp.asarray(300.0, dtype)).dtype == dtype
        op = CTFOperator(ctf, (8, 9))
        assert op.in_structure().dtype == dtype
        x = jnp.ones((2, 8, 9), dtype)
        assert op.mv(x).dtype == dtype
        assert phase_flip(x, ctf).dtype == dtype
    assert ctf_2d((8, 9), 2.0, 1.0).dtype == jnp.float32


_BAD_INPUTS = {
    "pixel_size zero": lambda: ctf_2d((8, 8), 0.0, 1.0),
    "pixel_size negative": lambda: ctf_2d((8, 8), -1.0, 1.0),
    "voltage zero": lambda: ctf_2d((8, 8), 1.0, 1.0, voltage_kv=0.0),
    "wavelength voltage negative": lambda: electron_wavelength(-300.0),
    "cs negative": lambda: ctf_2d((8, 8), 1.0, 1.0, cs_mm=-0.1),
    "amplitude negative": lambda: ctf_2d((8, 8), 1.0, 1.0, amplitude_contrast=-0.01),
    "amplitude one": lambda: ctf_2d((8, 8), 1.0, 1.0, amplitude_contrast=1.0),
    "b_factor negative": lambda: ctf_2d((8, 8), 1.0, 1.0, b_factor=-5.0),
    "defocus nan": lambda: ctf_2d((8, 8), 1.0, jnp.asarray([1.0, jnp.nan])),
    "defocus inf": lambda: ctf_2d((8, 8), 1.0, np.inf),
    "image_shape 3d": lambda: ctf_2d((4, 8, 8), 1.0, 1.0),
    "operator ctf shape": lambda: CTFOperator(jnp.ones((8, 8)), (8, 8)),
    "operator ctf odd width": lambda: CTFOperator(jnp.ones((8, 5)), (8, 10)),
    "operator leading axes": lambda: CTFOperator(jnp.ones((3, 8, 5)), (4, 8, 8)),
    "operator complex ctf": lambda: CTFOperator(jnp.ones((8, 5), jnp.complex64), (8, 8)),
    "operator input shape": lambda: CTFOperator(jnp.ones((8, 5)), (8, 8)).mv(jnp.ones((8, 9))),
    "phase_flip ctf shape": lambda: phase_flip(jnp.ones((3, 8, 8)), jnp.ones((3, 8, 8))),
    "phase_flip leading axes": lambda: phase_flip(jnp.ones((3, 8, 8)), jnp.ones((2, 8, 5))),
}


@pytest.mark.parametrize("name", list(_BAD_INPUTS))
def test_bad_input_raises_value_error(name):
    with pytest.raises(ValueError) as info:
        _BAD_INPUTS[name]()
    assert "\n" not in str(info.value)
