"""cryojax_mw.nn: the DeepFinder U-Net (exact convolution rewrites, layout), losses against hand
computations, targets against the simulator, class-balanced sampling and its augmentation, and
training (overfitting, exact resume, pickle-free checkpoints that refuse corruption)."""

import functools
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import lax

from cryojax_mw.io import ParticleList
from cryojax_mw.nn import (
    DeepFinderUNet,
    LabelledTomogram,
    PatchSampler,
    TrainConfig,
    cross_entropy_loss,
    dice_loss,
    flip_tilt_axis,
    turn_beam_axis,
    learning_rate_schedule,
    load_dataset,
    load_segmenter,
    shape_targets,
    sphere_targets,
    split_train_val,
    train_segmenter,
    tversky_loss,
    zscore_patches,
)
from cryojax_mw.nn._train import _gradients
from cryojax_mw.nn._conv import _EXTENSION, _winograd_matrices, fused_conv
from cryojax_mw.nn._unet import _UpConv3d
from cryojax_mw.simulate import SimulationConfig, write_dataset

TINY = (4, 6)  # one pooling: the training tests compile fast
DN_3D = ("NDHWC", "DHWIO", "NDHWC")
# Test inputs from NumPy: XLA:CPU takes seconds to compile a JAX random draw of rank-5 shape.
RNG = np.random.default_rng(0)


def _particles(class_ids, positions, names=("a", "b")):
    n = len(class_ids)
    return ParticleList(
        class_names=names,
        class_ids=np.asarray(class_ids, np.int64),
        positions=np.asarray(positions, np.float64).reshape(n, 3),
        angles_deg=np.zeros((n, 3)),
        voxel_size=10.0,
        tomo_name="t",
    )


def _labelled(seed, shape=(24, 32, 32), n=10):
    """Balls of two classes in noise; the tomogram is brighter where the label is higher."""
    rng = np.random.default_rng(seed)
    particles = _particles(rng.integers(1, 3, n), rng.uniform(3, np.array(shape) - 3, (n, 3)))
    labels = sphere_targets(shape, particles, [3.0, 2.0])
    tomogram = (labels + rng.uniform(0, 0.9, shape)).astype(np.float32)
    return LabelledTomogram(tomogram, labels, particles, f"t{seed}")


@pytest.fixture(scope="module")
def tiny_model():
    return DeepFinderUNet(3, widths=TINY, rngs=nnx.Rngs(0))


# ------------------------------------------------------------------------------------ network


def test_unet_maps_patches_to_logits_and_predict_proba_is_their_softmax(tiny_model):
    x = jnp.asarray(RNG.normal(size=(2, 8, 16, 12, 1)), jnp.float32)
    logits, probs = nnx.jit(lambda m, x: (m(x), m.predict_proba(x)))(tiny_model, x)
    assert logits.shape == (2, 8, 16, 12, 3) and logits.dtype == jnp.float32
    np.testing.assert_allclose(probs, jax.nn.softmax(logits), atol=2e-6)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_unet_refuses_sizes_that_pooling_cannot_halve_and_wrong_layouts(tiny_model):
    with pytest.raises(ValueError, match="multiples of 4"):
        DeepFinderUNet(3, widths=(4, 6, 8), rngs=nnx.Rngs(0))(jnp.zeros((1, 18, 16, 16, 1)))
    with pytest.raises(ValueError, match="channels-last"):
        tiny_model(jnp.zeros((1, 16, 16, 16)))
    with pytest.raises(ValueError, match="n_classes"):
        DeepFinderUNet(1, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("m,r", [(2, 3), (4, 3), (4, 2), (6, 3), (4, 5)])
def test_winograd_matrices_compute_a_correlation(m, r):
    bt, g, at = _winograd_matrices(m, r)
    d, kernel = RNG.normal(size=m + r - 1), RNG.normal(size=r)
    want = [d[i : i + r] @ kernel for i in range(m)]
    np.testing.assert_allclose(at @ ((g @ kernel) * (bt @ d)), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("padding", [(1, 1), (0, 1)])
def test_fused_conv_is_relu_of_the_lax_convolution_of_the_concatenated_parts_plus_bias(padding):
    with jax.enable_x64(True):
        parts = [jnp.asarray(RNG.normal(size=(2, 5, 6, 7, c))) for c in (3, 2)]
        k = sum(padding) + 1
        kernel = jnp.asarray(RNG.normal(size=(k,) * 3 + (5, 4)))
        bias = jnp.asarray(RNG.normal(size=4))
        want = lax.conv_general_dilated(jnp.concatenate(parts, -1), kernel, (1, 1, 1),
                                        [padding] * 3, dimension_numbers=DN_3D)  # fmt: skip
        got = fused_conv(parts, kernel, bias, padding, relu=True)
        np.testing.assert_allclose(got, np.maximum(want + bias, 0), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="does not keep the size"):
        fused_conv(parts, kernel, bias, (0, 0))


def _relative_error(got, want):
    return float(np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want))


@pytest.mark.parametrize(
    "channels,co,k,upsample,relu,bias,shape",
    [
        ((32,), 32, 3, False, True, True, (2, 9, 10, 11)),  # partial tiles along every axis
        ((16, 32), 48, 3, False, True, True, (1, 8, 7, 6)),  # two parts: the U-Net's skips
        ((1,), 32, 3, False, True, True, (1, 8, 8, 8)),  # one channel: its own convolution
        ((1,), 16, 2, False, False, False, (2, 5, 6, 7)),  # the same for 2^3, no bias or ReLU
        ((16,), 13, 3, False, False, True, (1, 5, 6, 7)),  # outputs not a multiple of 16
        ((32,), 8 * 16, 2, True, True, True, (1, 5, 4, 6)),  # up-convolution
        ((16,), 8 * 32, 2, True, False, False, (2, 3, 4, 5)),
        ((16,), 8 * 24, 2, True, True, True, (1, 4, 3, 5)),  # 24 per parity, padded to 32
    ],
)
def test_cpu_kernels_match_the_float64_definition_in_value_and_gradients(
    channels, co, k, upsample, relu, bias, shape
):
    """The extension (float32, CPU) against `fused_conv`'s float64 lax path: the result and the
    pullbacks of all three arguments (ReLU masks, partial tiles, padded channels)."""
    assert _EXTENSION is not None, "the CPU convolution kernels were not built"
    padding = (1, 1) if k == 3 else (0, 1)
    parts = [RNG.normal(size=shape + (c,)).astype(np.float32) for c in channels]
    kernel = (RNG.normal(size=(k,) * 3 + (sum(channels), co)) / math.sqrt(k**3 * sum(channels)))
    kernel = kernel.astype(np.float32)
    b = (RNG.normal(size=co // 8 if upsample else co) / 10).astype(np.float32) if bias else None

    def conv(parts, kernel, b):
        return fused_conv(parts, kernel, b, padding, relu=relu, upsample=upsample)

    lowered = jax.jit(lambda *a: jax.vjp(conv, *a)[1](jnp.ones_like(conv(*a))))
    assert "winograd_forward" in lowered.lower(parts, kernel, b).as_text()
    got, pullback = jax.vjp(jax.jit(conv), parts, kernel, b)
    with jax.enable_x64(True):
        as64 = functools.partial(jax.tree.map, lambda a: np.asarray(a, np.float64))
        want, want_pullback = jax.vjp(conv, as64(parts), as64(kernel), as64(b))
        cotangent = RNG.normal(size=want.shape)
        want_grads = want_pullback(cotangent)
    got_grads = pullback(cotangent.astype(np.float32))
    # float32 rounding through the transforms: measured 1e-6 to 4e-6.
    assert _relative_error(got, want) < 1e-5
    for g, w in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads), strict=True):
        assert _relative_error(g, w) < 1e-5


def test_cpu_kernels_give_the_same_weight_gradient_on_every_call():
    """A gradient summed over about a hundred blocks of tiles: the threads share the blocks
    differently from call to call, the sum must not change (with one partial sum per thread it
    changed by about 1e-5 of its size, so the same seed did not give the same training run)."""
    x = jnp.asarray(RNG.normal(size=(5, 40, 40, 40, 16)), jnp.float32)
    kernel = jnp.asarray(RNG.normal(size=(3, 3, 3, 16, 32)) / 20, jnp.float32)
    cotangent = jnp.asarray(RNG.normal(size=(5, 40, 40, 40, 32)), jnp.float32)
    grad = jax.jit(
        jax.grad(lambda k: (fused_conv([x], k, None, (1, 1), relu=True) * cotangent).sum())
    )
    first = np.asarray(grad(kernel))
    for _ in range(4):
        np.testing.assert_array_equal(np.asarray(grad(kernel)), first)


def test_cpu_kernels_run_side_by_side_in_one_computation():
    """Independent convolutions that XLA may schedule on different threads share the extension's
    thread pool: all finish, each with its own result."""
    x = jnp.asarray(RNG.normal(size=(4, 1, 12, 12, 12, 16)), jnp.float32)
    kernel = jnp.asarray(RNG.normal(size=(3, 3, 3, 16, 16)) / 20, jnp.float32)

    @jax.jit
    def several(x, kernel):
        return [jax.grad(lambda k: fused_conv([xi], k, None, (1, 1), relu=True).sum())(kernel)
                for xi in x]  # fmt: skip

    grads = several(x, kernel)
    for xi, g in zip(x, grads):
        one = jax.grad(lambda k: fused_conv([xi], k, None, (1, 1), relu=True).sum())(kernel)
        np.testing.assert_allclose(g, one, rtol=1e-6, atol=1e-6)


def test_upconv_equals_nearest_upsampling_then_same_2cube_convolution():
    with jax.enable_x64(True):
        kernel = jnp.asarray(RNG.normal(size=(2, 2, 2, 5, 4)))
        layer = _UpConv3d(kernel)
        layer.bias[...] = jnp.asarray(RNG.normal(size=4))
        x = jnp.asarray(RNG.normal(size=(2, 3, 4, 5, 5)))

        @nnx.jit
        def two_ways(layer, x):
            up = jnp.repeat(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2), 2, axis=3)
            want = lax.conv_general_dilated(up, kernel, (1, 1, 1), "SAME", dimension_numbers=DN_3D)
            return want + layer.bias[...], layer(x)

        want, got = two_ways(layer, x)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_unet_has_the_published_deepfinder_layers():
    model = DeepFinderUNet(13, rngs=nnx.Rngs(0))

    def conv(k, cin, cout):
        return k**3 * cin * cout + cout

    published = (
        conv(3, 1, 32) + conv(3, 32, 32) + conv(3, 32, 48) + conv(3, 48, 48)
        + conv(3, 48, 64) + 3 * conv(3, 64, 64)
        + conv(2, 64, 64) + conv(3, 64 + 48, 48) + conv(3, 48, 48)
        + conv(2, 48, 48) + conv(3, 48 + 32, 32) + conv(3, 32, 32)
        + conv(1, 32, 13)
    )  # fmt: skip
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert sum(p.size for p in params) == published
    kernels = [p for p in params if p.ndim == 5]
    # He-normal: the kernels' spread follows sqrt(2 / fan_in).
    for k in kernels:
        if k.size > 10_000:
            np.testing.assert_allclose(np.std(k), math.sqrt(2 / math.prod(k.shape[:-1])), rtol=0.05)


# ------------------------------------------------------------------------------------ losses


def test_losses_match_a_hand_computation():
    with jax.enable_x64(True):
        logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
        labels = jnp.array([0, 1, 1])
        p = np.exp(np.asarray(logits))
        p /= p.sum(1, keepdims=True)
        t = np.eye(2)[np.asarray(labels)]
        eps = 1e-6
        dice = (2 * (p * t).sum(0) + 2 * eps) / (p.sum(0) + t.sum(0) + 2 * eps)
        np.testing.assert_allclose(dice_loss(logits, labels), 1 - dice.mean(), rtol=1e-12)
        np.testing.assert_allclose(
            dice_loss(logits, labels, class_weights=[1.0, 3.0]),
            1 - (dice[0] + 3 * dice[1]) / 4,
            rtol=1e-12,
        )
        ce = -np.log(p[np.arange(3), np.asarray(labels)])
        np.testing.assert_allclose(cross_entropy_loss(logits, labels), ce.mean(), rtol=1e-12)
        weights = np.array([2.0, 0.5])[np.asarray(labels)]
        np.testing.assert_allclose(
            cross_entropy_loss(logits, labels, class_weights=[2.0, 0.5]),
            (weights * ce).sum() / weights.sum(),
            rtol=1e-12,
        )
        smooth = 0.9 * t + 0.1 / 2
        np.testing.assert_allclose(
            cross_entropy_loss(logits, labels, label_smoothing=0.1),
            -(smooth * np.log(p)).sum(1).mean(),
            rtol=1e-12,
        )
        tp, fp, fn = (p * t).sum(0), (p * (1 - t)).sum(0), ((1 - p) * t).sum(0)
        index = (tp + eps) / (tp + 0.3 * fp + 0.7 * fn + eps)
        np.testing.assert_allclose(
            tversky_loss(logits, labels, alpha=0.3, beta=0.7), 1 - index.mean(), rtol=1e-12
        )


def test_tversky_at_half_half_is_dice_and_beta_weights_misses():
    with jax.enable_x64(True):
        logits = jnp.asarray(RNG.normal(size=(2, 6, 6, 6, 4)) * 3)
        labels = jnp.asarray(RNG.integers(0, 4, (2, 6, 6, 6)))
        tversky, dice = jax.jit(lambda a, b: (tversky_loss(a, b), dice_loss(a, b)))(logits, labels)
        np.testing.assert_allclose(tversky, dice, rtol=1e-12)
        # A prediction that misses half of class 1 and predicts nothing extra: false negatives
        # only, which beta weighs.
        labels = jnp.array([1, 1, 1, 1, 0, 0])
        miss = jnp.array([[-20.0, 20.0]] * 2 + [[20.0, -20.0]] * 4)
        only_class_1 = {"class_weights": [0.0, 1.0]}
        assert tversky_loss(miss, labels, alpha=0.2, beta=0.8, **only_class_1) > tversky_loss(
            miss, labels, alpha=0.8, beta=0.2, **only_class_1
        )


def test_perfect_predictions_cost_nothing_and_gradients_stay_finite():
    labels = jnp.asarray(RNG.integers(0, 3, (2, 8, 8, 8)))
    perfect = 40.0 * jax.nn.one_hot(labels, 3)
    extreme = jnp.asarray(1e3 * RNG.normal(size=(2, 8, 8, 8, 3)), jnp.float32)

    @jax.jit
    def values_and_gradients(labels):
        losses = (dice_loss, tversky_loss, cross_entropy_loss)
        return [loss(perfect, labels) for loss in losses], [
            jax.grad(loss)(extreme, labels) for loss in losses
        ]

    values, grads = values_and_gradients(labels)
    assert max(values) < 1e-5
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    with pytest.raises(ValueError, match="one weight per class"):
        dice_loss(perfect, labels, class_weights=[1.0, 2.0])


# ------------------------------------------------------------------------------------ targets


def test_sphere_targets_hold_the_ball_volume_and_split_overlaps_by_nearest_centre():
    r = 7.3
    particles = _particles([1, 2], [[20.3, 19.6, 20.45], [20.0, 20.0, 60.0]])
    labels = sphere_targets((40, 40, 80), particles, [r, 4.0])
    assert abs(np.count_nonzero(labels == 1) / (4 / 3 * math.pi * r**3) - 1) < 0.02
    assert abs(np.count_nonzero(labels == 2) / (4 / 3 * math.pi * 4.0**3) - 1) < 0.06
    overlapping = _particles([1, 2], [[10, 10, 10], [10, 10, 16]])
    labels = sphere_targets((20, 20, 30), overlapping, 5.0)
    assert labels[10, 10, 12] == 1 and labels[10, 10, 14] == 2
    np.testing.assert_array_equal(labels, sphere_targets((20, 20, 30), overlapping, [5.0, 5.0]))
    with pytest.raises(ValueError, match="one per class"):
        sphere_targets((20, 20, 30), overlapping, [1.0, 2.0, 3.0])


@pytest.fixture(scope="module")
def sim_dataset(tmp_path_factory):
    config = SimulationConfig(
        shape=(32, 48, 48), classes=("1bxn", "3gl1"), n_particles=6, occupancy=None,
        n_vesicles=0, n_gold=1, n_decoys=2, tilt_step=6.0,
    )  # fmt: skip
    folder = write_dataset(tmp_path_factory.mktemp("sim"), config, 1, seed=3, progress=False)
    return config, folder


def test_shape_targets_reproduce_the_simulators_particle_labels(sim_dataset):
    config, folder = sim_dataset
    (item,) = load_dataset(folder).tomograms
    labels = shape_targets(config.shape, item.particles, config.load_templates())
    particle_labels = np.where(item.labels <= len(config.classes), item.labels, 0)
    assert np.count_nonzero(particle_labels) > 500
    np.testing.assert_array_equal(labels, particle_labels)
    by_name = dict(zip(config.classes, config.load_templates()))
    np.testing.assert_array_equal(shape_targets(config.shape, item.particles, by_name), labels)


def test_load_dataset_keeps_every_label_as_a_class(sim_dataset):
    config, folder = sim_dataset
    dataset = load_dataset(folder)
    assert dataset.label_names == config.label_names
    (item,) = dataset.tomograms
    assert item.tomogram.dtype == np.float32 and item.tomogram.shape == config.shape
    assert set(np.unique(item.labels)) <= set(range(len(config.label_names)))
    assert dataset.voxel_size == config.voxel_size
    with pytest.raises(ValueError, match="not in"):
        load_dataset(folder, names=["tomo_009"])


def test_split_by_tomograms_and_a_single_tomogram_across_y():
    items = [_labelled(s) for s in range(4)]
    train, val = split_train_val(jax.random.key(0), items, 0.25)
    assert len(train) == 3 and len(val) == 1
    assert {t.name for t in train} | {t.name for t in val} == {t.name for t in items}
    assert split_train_val(jax.random.key(0), items, 0.25)[1][0].name == val[0].name
    (train,), (val,) = split_train_val(jax.random.key(0), items[:1], 0.25)
    assert train.tomogram.shape == (24, 24, 32) and val.tomogram.shape == (24, 8, 32)
    assert len(train.particles) + len(val.particles) == len(items[0].particles)
    for part in (train, val):  # re-based positions still point at their own labels
        for cid, pos in zip(part.particles.class_ids, np.rint(part.particles.positions)):
            assert part.labels[tuple(pos.astype(int))] == cid


# ------------------------------------------------------------------------------------ patches


def test_flip_about_the_tilt_axis_is_an_involution_sending_z_x_to_minus_z_minus_x():
    volume = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    flipped = flip_tilt_axis(volume)
    assert flipped[0, 2, 0] == volume[3, 2, 5] and flipped[1, 3, 4] == volume[2, 3, 1]
    np.testing.assert_array_equal(flip_tilt_axis(flipped), volume)
    np.testing.assert_array_equal(flip_tilt_axis(jnp.asarray(volume)), flipped)


def test_turn_about_the_beam_axis_is_an_involution_sending_y_x_to_minus_y_minus_x():
    volume = np.arange(4 * 5 * 6).reshape(4, 5, 6)
    turned = turn_beam_axis(volume)
    assert turned[0, 0, 0] == volume[0, 4, 5] and turned[3, 1, 4] == volume[3, 3, 1]
    np.testing.assert_array_equal(turn_beam_axis(turned), volume)
    np.testing.assert_array_equal(turn_beam_axis(jnp.asarray(volume)), turned)


def test_sampler_turns_image_and_label_together_and_changes_nothing_else():
    data = [_labelled(0), _labelled(1)]
    kwargs = {"n_classes": 3, "patch_size": 8, "max_shift": 2, "flip_probability": 0.5}
    plain = PatchSampler(data, **kwargs).sample(jax.random.key(5), 16)
    turned = PatchSampler(data, turn_probability=1.0, **kwargs).sample(jax.random.key(5), 16)
    np.testing.assert_array_equal(turned.starts, plain.starts)
    np.testing.assert_array_equal(turned.flipped, plain.flipped)
    assert turned.turned.all() and not plain.turned.any()
    np.testing.assert_array_equal(turned.images, turn_beam_axis(plain.images))
    np.testing.assert_array_equal(turned.labels, turn_beam_axis(plain.labels))


def test_sampler_flips_image_and_label_together_and_keeps_them_aligned():
    data = [_labelled(0), _labelled(1)]
    kwargs = {"n_classes": 3, "patch_size": 8, "max_shift": 2, "background_fraction": 0.25}
    plain = PatchSampler(data, flip_probability=0.0, **kwargs).sample(jax.random.key(5), 16)
    flipped = PatchSampler(data, flip_probability=1.0, **kwargs).sample(jax.random.key(5), 16)
    np.testing.assert_array_equal(flipped.starts, plain.starts)
    assert flipped.flipped.all() and not plain.flipped.any()
    np.testing.assert_array_equal(flipped.images, flip_tilt_axis(plain.images))
    np.testing.assert_array_equal(flipped.labels, flip_tilt_axis(plain.labels))
    for image, label, t, start in zip(plain.images, plain.labels, plain.tomograms, plain.starts):
        window = tuple(slice(s, s + 8) for s in start)
        np.testing.assert_array_equal(label, data[t].labels[window])
        np.testing.assert_allclose(image, zscore_patches(data[t].tomogram[window]), atol=1e-5)
        np.testing.assert_allclose([image.mean(), image.std()], [0, 1], atol=1e-5)


def test_batches_are_class_balanced_whatever_the_class_sizes():
    shape = (16, 40, 40)
    rng = np.random.default_rng(0)
    particles = _particles(
        [1] * 40 + [2] * 2, np.vstack([rng.uniform(0, 15, (40, 3)) + [0, 12, 12], [[8, 5, 5]] * 2])
    )  # fmt: skip
    labels = np.zeros(shape, np.int16)
    labels[:, 35:, :] = 3  # a class without particle positions: centred on its voxels
    item = LabelledTomogram(rng.normal(size=shape).astype(np.float32), labels, particles)
    sampler = PatchSampler([item], n_classes=4, patch_size=8, max_shift=1, background_fraction=0.25)
    assert sampler.class_counts() == {1: 40, 2: 2, 3: 16 * 5 * 40}
    batch = sampler.sample(jax.random.key(0), 2400)
    counts = np.bincount(batch.classes, minlength=4)
    assert counts[0] == 600
    np.testing.assert_allclose(counts[1:] / 1800, 1 / 3, atol=0.035)  # sd 0.011
    assert np.all(batch.labels[batch.classes == 3][:, :, :, -1].max(axis=(1, 2)) == 3)
    inside = (batch.starts >= 0) & (batch.starts <= np.array(shape) - 8)
    assert inside.all()
    again = sampler.sample(jax.random.key(0), 2400)
    np.testing.assert_array_equal(again.images, batch.images)
    assert not np.array_equal(sampler.sample(jax.random.key(1), 2400).starts, batch.starts)


def test_sampler_says_when_a_tomogram_is_smaller_than_the_patch():
    with pytest.raises(ValueError, match="smaller than the patch size"):
        PatchSampler([_labelled(0)], n_classes=3, patch_size=32)
    with pytest.raises(ValueError, match="label names"):
        PatchSampler([_labelled(0)], n_classes=2, patch_size=8)


def test_sampler_refuses_data_without_particles_unless_it_samples_background_only():
    shape = (12, 12, 12)
    empty = LabelledTomogram(
        RNG.normal(size=shape).astype(np.float32), np.zeros(shape, np.int16),
        _particles([], np.zeros((0, 3))), "empty",
    )  # fmt: skip
    with pytest.raises(ValueError, match="no particle and no labelled voxel"):
        PatchSampler([empty], n_classes=3, patch_size=8)
    batch = PatchSampler([empty], n_classes=3, patch_size=8, background_fraction=1.0).sample(
        jax.random.key(0), 4
    )
    assert batch.images.shape == (4, 8, 8, 8) and not batch.labels.any()


# ------------------------------------------------------------------------------------ training


def test_tiny_unet_overfits_one_batch():
    batch = PatchSampler([_labelled(0)], n_classes=3, patch_size=16, max_shift=2).sample(
        jax.random.key(0), 2
    )
    model = DeepFinderUNet(3, widths=TINY, rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)
    x, y = jnp.asarray(batch.images)[..., None], jnp.asarray(batch.labels)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: cross_entropy_loss(m(x), y))(model)
        optimizer.update(model, grads)
        return loss, grads

    first, grads = step(model, optimizer)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    for _ in range(40):
        last, _ = step(model, optimizer)
    assert float(last) < float(first) / 10


def _loss_params(n_classes):
    return {"class_weights": [1.0] * n_classes, "label_smoothing": 0.0, "alpha": 0.5, "beta": 0.5}


def _config(**changes):
    settings = {
        "patch_size": 16, "batch_size": 4, "micro_batch_size": 1, "steps": 6,
        "learning_rate": 3e-3, "max_shift": 3, "widths": TINY, "validate_every": 3,
        "validation_size": 4, "checkpoint_every": 3, "concurrent_micro_batches": 2,
    }  # fmt: skip
    return TrainConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    segmenter = train_segmenter(
        _config(), [_labelled(0), _labelled(1)], [_labelled(2)], out, progress=False
    )
    return out, segmenter


def _weights(segmenter):
    return jax.tree.leaves(nnx.state(segmenter.model, nnx.Param))


def test_checkpoint_round_trip_is_exact_and_predicts_from_raw_patches(straight_run, trace_counter):
    out, segmenter = straight_run
    loaded = load_segmenter(out)
    assert loaded.class_names == ("background", "a", "b") and loaded.step == 6
    assert loaded.patch_size == 16 and loaded.voxel_size == 10.0
    for a, b in zip(_weights(loaded), _weights(segmenter)):
        np.testing.assert_array_equal(a, b)
    raw = _labelled(3).tomogram[None, :16, :16, :16]
    probs = loaded.predict_proba(raw)
    assert probs.shape == (1, 16, 16, 16, 3)
    # Raw patches are z-scored first: an affine change of intensities changes nothing.
    np.testing.assert_allclose(probs, loaded.predict_proba(5 * raw + 3), atol=1e-5)
    np.testing.assert_array_equal(probs, segmenter.predict_proba(raw))
    with trace_counter:
        loaded.predict_proba(2 * raw)
    assert trace_counter.count == 0
    # Averaged over the wedge-preserving rotations, the prediction commutes with each of them.
    averaged = loaded.predict_proba(raw, average_rotations=True)
    assert not np.allclose(averaged, probs, atol=1e-3)
    for rotate in (flip_tilt_axis, turn_beam_axis, lambda v: flip_tilt_axis(turn_beam_axis(v))):
        np.testing.assert_allclose(
            loaded.predict_proba(rotate(raw), average_rotations=True),
            jnp.moveaxis(rotate(jnp.moveaxis(averaged, -1, 0)), 0, -1), atol=1e-5,
        )  # fmt: skip
    history = json.loads((out / "history.json").read_text())
    assert history["step"] == [1, 2, 3, 4, 5, 6] and history["validation"]["step"] == [3, 6]
    assert len(history["validation"]["dice"][0]) == 3 and (out / "history.png").stat().st_size
    assert sorted(p.name for p in out.glob("*.npz")) == [
        "optimizer_00000006.npz", "weights_00000006.npz",
    ]  # fmt: skip


def test_resumed_run_ends_exactly_where_an_uninterrupted_one_does(straight_run, tmp_path):
    out, segmenter = straight_run
    data = ([_labelled(0), _labelled(1)], [_labelled(2)])
    train_segmenter(_config(steps=3), *data, tmp_path, progress=False)
    resumed = train_segmenter(_config(), *data, tmp_path, progress=False)
    for a, b in zip(_weights(resumed), _weights(segmenter)):
        np.testing.assert_array_equal(a, b)
    ours, theirs = (json.loads((d / "checkpoint.json").read_text()) for d in (tmp_path, out))
    assert ours["history"]["loss"] == theirs["history"]["loss"]
    assert ours["history"]["validation"]["loss"] == theirs["history"]["validation"]["loss"]
    with pytest.raises(ValueError, match="other settings"):
        train_segmenter(_config(learning_rate=1e-3), *data, tmp_path, progress=False)


def test_cosine_schedule_starts_at_the_learning_rate_then_decays(straight_run, tmp_path):
    _, constant = straight_run
    data = ([_labelled(0), _labelled(1)], [_labelled(2)])
    cosine = _config(learning_rate_schedule="cosine")
    # Step 1 takes the full learning rate, as the constant run's first step (same batch).
    first = train_segmenter(_config(steps=1), *data, tmp_path / "constant_1", progress=False)
    first_cosine = train_segmenter(
        _config(steps=1, learning_rate_schedule="cosine"), *data, tmp_path / "a", progress=False
    )
    for a, b in zip(_weights(first_cosine), _weights(first)):
        np.testing.assert_array_equal(a, b)
    # Later steps are smaller: after six steps the weights have moved less than at constant rate.
    init = train_segmenter(_config(steps=1, learning_rate=1e-30), *data, tmp_path / "init",
                           progress=False)  # fmt: skip
    decayed = train_segmenter(cosine, *data, tmp_path / "b", progress=False)

    def moved(run):
        return sum(float(jnp.sum((a - b) ** 2)) for a, b in zip(_weights(run), _weights(init)))

    assert 0 < moved(decayed) < moved(constant)
    # Its schedule depends on the number of steps: resuming with other steps would not be exact.
    with pytest.raises(ValueError, match="other settings \\(steps\\)"):
        train_segmenter(_config(steps=9, learning_rate_schedule="cosine"), *data, tmp_path / "b",
                        progress=False)  # fmt: skip


def test_constant_then_decay_keeps_the_rate_for_80_percent_then_falls_in_a_line_to_0():
    rate = learning_rate_schedule(
        _config(steps=100, learning_rate=2e-3, learning_rate_schedule="constant-then-decay")
    )
    rates = np.array([float(rate(step)) for step in range(101)])
    np.testing.assert_allclose(rates[:81], 2e-3, rtol=1e-6)
    np.testing.assert_allclose(rates[80:], 2e-3 * (1 - np.arange(21) / 20), rtol=1e-5, atol=1e-12)
    # The other schedules, for comparison: a number, and a cosine from the rate to 0.
    assert learning_rate_schedule(_config(learning_rate=2e-3)) == 2e-3
    cosine = learning_rate_schedule(_config(steps=100, learning_rate_schedule="cosine"))
    assert float(cosine(0)) == pytest.approx(3e-3) and float(cosine(100)) == pytest.approx(0)


def test_same_seed_gives_the_same_weights_and_another_seed_others(tmp_path):
    data = ([_labelled(0)], [_labelled(2)])
    runs = [
        train_segmenter(_config(steps=1, seed=seed), *data, tmp_path / name, progress=False)
        for name, seed in (("a", 0), ("b", 0), ("c", 1))
    ]
    for a, b in zip(_weights(runs[0]), _weights(runs[1])):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, c) for a, c in zip(_weights(runs[0]), _weights(runs[2])))


def test_micro_batch_gradients_add_up_to_the_whole_batch_cross_entropy_gradient(tiny_model):
    batch = PatchSampler([_labelled(0)], n_classes=3, patch_size=16).sample(jax.random.key(0), 2)
    x, y = jnp.asarray(batch.images), jnp.asarray(batch.labels)
    params = {name: jnp.asarray(v, jnp.float32) for name, v in _loss_params(3).items()}
    whole_loss, _, whole = _gradients(tiny_model, x, y, params, loss="ce", parts=1)
    parts_loss, _, parts = _gradients(tiny_model, x, y, params, loss="ce", parts=2)
    np.testing.assert_allclose(parts_loss / 2, whole_loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(parts)):
        np.testing.assert_allclose(b / 2, a, rtol=1e-4, atol=1e-7)


def test_corrupt_or_missing_checkpoints_are_refused(straight_run, tmp_path):
    out, _ = straight_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    weights = copy / "weights_00000006.npz"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        load_segmenter(copy)
    weights.write_bytes(bytes(data[: len(data) // 2]))  # truncated, as by a full disk
    with pytest.raises(ValueError, match="corrupt"):
        load_segmenter(copy)
    weights.unlink()
    with pytest.raises(ValueError, match="missing"):
        load_segmenter(copy)
    (copy / "checkpoint.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_segmenter(copy)
    with pytest.raises(ValueError, match="no checkpoint.json"):
        load_segmenter(tmp_path)


def test_concurrent_micro_batches_divide_the_step():
    assert _config(batch_size=24, concurrent_micro_batches=4).micro_batches_per_call == 4
    assert _config(batch_size=20, concurrent_micro_batches=8).micro_batches_per_call == 5
    assert _config(batch_size=25, concurrent_micro_batches=4).micro_batches_per_call == 1
    assert _config(batch_size=2, micro_batch_size=2).micro_batches_per_call == 1
    # by default a micro-batch is the largest divisor of the batch up to 5
    for batch, micro in ((24, 4), (25, 5), (7, 1), (2, 2)):
        assert TrainConfig(batch_size=batch).micro_batch_size == micro


@pytest.mark.parametrize(
    "change,message",
    [
        ({"patch_size": 17}, "multiple of 2"),
        ({"micro_batch_size": 3}, "divide batch_size"),
        ({"loss": "focal"}, "loss must be one of"),
        ({"learning_rate_schedule": "step"}, "learning_rate_schedule must be one of"),
        ({"max_shift": 8}, "max_shift"),
    ],
)
def test_bad_training_settings_say_what_to_change(change, message):
    with pytest.raises(ValueError, match=message):
        _config(**change)
