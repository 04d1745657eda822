"""Crowded synthetic tomograms with ground truth, and dataset folders of them.

A tomogram is built in three steps: a sample (membranes, gold beads, macromolecules at random
positions and uniformly random orientations, decoys; no two shapes overlap), its acquisition
(`simulate_tilt_series`) and a WBP reconstruction that carries the missing wedge.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from ..io import (
    ParticleList,
    atomic_write,
    write_mrc,
    write_particles_csv,
    write_particles_star,
    write_tilt_angles,
)
from ..operators import TiltGeometry, TiltProjector, phase_flip
from ..reconstruct import wbp
from ._acquisition import NOISE_MODELS, TILT_ORDERS, TiltSeriesSimulation, simulate_tilt_series
from ._placement import Canvas, ellipsoid, flat_membrane, gold_bead, mask_bounds, vesicle
from ._rotations import random_euler_zyz, rotate_volume
from ._templates import Template, load_template

# The twelve macromolecules of the SHREC'21 cryo-ET benchmark, small to large.
SHREC_CLASSES = (
    "3qm1", "1s3x", "3gl1", "3h84", "2cg9", "3d2f", "1u6g", "3cf3", "1bxn", "1qvr", "4cr2", "5mrc",
)  # fmt: skip
# Labels after the macromolecule classes, in this order.
EXTRA_LABELS = ("membrane", "gold", "decoy")
# Random sequential packing of hard bodies jams near 0.38 (spheres); beyond 0.35 it rarely ends.
MAX_OCCUPANCY = 0.35
# Tries per body before a new orientation is drawn, and orientations before the body is given up.
_POSITIONS_PER_ORIENTATION = 30
_ORIENTATIONS_PER_BODY = 10


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
    """Everything that defines a synthetic tomogram (lengths in Angstrom unless said otherwise).

    Sample: `shape` (z, y, x) voxels at `voxel_size`; `classes` (template names); either
    `n_particles` (exact count, classes balanced) or `occupancy` (fraction of the volume covered
    by macromolecule shapes; classes drawn uniformly); `n_vesicles` spherical vesicles of radius
    in `vesicle_radius`, `n_flat_membranes` membranes across the volume, `n_gold` gold beads of
    radius `gold_radius` and density `gold_contrast` (macromolecules have mean 1), `n_decoys`
    ellipsoids and discs with semi-axes in `decoy_size`. `templates`: folder of maps (None = the
    maps shipped with the package); `mask_level`: shape threshold (fraction of each map's max).

    Acquisition: tilts `tilt_min`..`tilt_max` by `tilt_step` degrees recorded in `tilt_order`;
    `snr` with `noise` "gaussian" or "poisson"; `total_dose` e/Å² for radiation damage (0 = off);
    CTF if `defocus` (micrometres underfocus) is set, with `voltage` kV, `cs` mm and
    `amplitude_contrast`; the tomogram is reconstructed by WBP with `wbp_filter` from the
    phase-flipped series when there is a CTF.
    """

    shape: tuple[int, int, int] = (64, 128, 128)
    voxel_size: float = 10.0
    classes: tuple[str, ...] = SHREC_CLASSES
    n_particles: int | None = None
    occupancy: float | None = 0.05
    n_vesicles: int = 1
    vesicle_radius: tuple[float, float] = (150.0, 300.0)
    n_flat_membranes: int = 0
    n_gold: int = 2
    gold_radius: float = 50.0
    gold_contrast: float = 5.0
    n_decoys: int = 10
    decoy_size: tuple[float, float] = (20.0, 60.0)
    templates: str | None = None
    mask_level: float = 0.25
    tilt_min: float = -60.0
    tilt_max: float = 60.0
    tilt_step: float = 2.0
    tilt_order: str = "dose-symmetric"
    snr: float = 0.1
    noise: str = "gaussian"
    total_dose: float = 100.0
    defocus: float | None = None
    voltage: float = 300.0
    cs: float = 2.7
    amplitude_contrast: float = 0.07
    wbp_filter: str = "hann"

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(n) for n in self.shape))
        object.__setattr__(self, "classes", tuple(self.classes))
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise ValueError(
                f"shape must be (z, y, x) with at least 8 voxels each, got {self.shape}"
            )
        if not self.voxel_size > 0:
            raise ValueError(f"voxel_size must be > 0 Angstrom, got {self.voxel_size}")
        if not self.classes:
            raise ValueError("give at least one class (template name)")
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes are listed twice: {', '.join(self.classes)}")
        clash = set(self.classes) & set(EXTRA_LABELS)
        if clash:
            raise ValueError(f"class names {sorted(clash)} are reserved for non-protein labels")
        if (self.n_particles is None) == (self.occupancy is None):
            raise ValueError("give exactly one of n_particles and occupancy")
        if self.n_particles is not None and self.n_particles < 0:
            raise ValueError(f"n_particles must be >= 0, got {self.n_particles}")
        if self.occupancy is not None and not 0 < self.occupancy <= MAX_OCCUPANCY:
            raise ValueError(
                f"occupancy {self.occupancy} cannot be reached by random packing; choose a value "
                f"in (0, {MAX_OCCUPANCY}]"
            )
        for name in ("n_vesicles", "n_flat_membranes", "n_gold", "n_decoys"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("vesicle_radius", "decoy_size"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must be a range 0 < min <= max, got ({lo}, {hi})")
        if not self.gold_radius > 0 or not self.gold_contrast > 0:
            raise ValueError("gold_radius and gold_contrast must be > 0")
        if not -90 < self.tilt_min < self.tilt_max < 90 or not self.tilt_step > 0:
            raise ValueError(
                f"tilt range must satisfy -90 < min < max < 90 with step > 0, got "
                f"{self.tilt_min}..{self.tilt_max} by {self.tilt_step}"
            )
        if self.tilt_order not in TILT_ORDERS:
            raise ValueError(f"tilt_order must be one of {', '.join(TILT_ORDERS)}")
        if self.noise not in NOISE_MODELS:
            raise ValueError(f"noise must be one of {', '.join(NOISE_MODELS)}")
        if not self.snr > 0:
            raise ValueError(f"snr must be > 0, got {self.snr}")
        if self.defocus is not None and not self.defocus > 0:
            raise ValueError(f"defocus must be > 0 micrometres (underfocus), got {self.defocus}")

    @property
    def label_names(self) -> tuple[str, ...]:
        """Names of the label values: 0 = background, then the classes, then EXTRA_LABELS."""
        return ("background", *self.classes, *EXTRA_LABELS)

    def label_of(self, name: str) -> int:
        return self.label_names.index(name)

    def geometry(self) -> TiltGeometry:
        return TiltGeometry.from_range(self.tilt_min, self.tilt_max, self.tilt_step)

    def ctf_parameters(self) -> dict | None:
        if self.defocus is None:
            return None
        return {
            "defocus_um": self.defocus,
            "voltage_kv": self.voltage,
            "cs_mm": self.cs,
            "amplitude_contrast": self.amplitude_contrast,
        }

    def load_templates(self) -> list[Template]:
        """The classes' templates at this voxel size; a clear error if one is missing, not a
        density map, or too big for the volume."""
        templates = [
            load_template(c, self.voxel_size, folder=self.templates, mask_level=self.mask_level)
            for c in self.classes
        ]
        for t in templates:
            if any(t.density.shape[0] > n for n in self.shape):
                raise ValueError(
                    f"class {t.name} is {t.density.shape[0]} voxels across at {self.voxel_size} Å "
                    f"and does not fit in a {self.shape} volume; enlarge the volume or the voxel "
                    "size"
                )
        return templates

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SimulatedTomogram:
    """One synthetic tomogram and its ground truth.

    Attributes:
        config: the parameters.
        ground_truth: (z, y, x) float32 density of everything placed.
        labels: (z, y, x) int16 class labels (`config.label_names`).
        instances: (z, y, x) int32 instance ids (0 = none); particles come first, so particle i
            of `particles` is instance `particle_instances[i]`.
        particles: the macromolecules as a `ParticleList`.
        particle_instances: (n_particles,) their instance ids.
        bodies: non-protein bodies (membranes, gold, decoys) with instance id and parameters.
        acquisition: the tilt series (`TiltSeriesSimulation`).
        tomogram: (z, y, x) WBP reconstruction of the noisy series.
        occupancy: fraction of voxels covered by macromolecule shapes.
    """

    config: SimulationConfig
    ground_truth: np.ndarray
    labels: np.ndarray
    instances: np.ndarray
    particles: ParticleList
    particle_instances: np.ndarray
    bodies: tuple[dict, ...]
    acquisition: TiltSeriesSimulation
    tomogram: np.ndarray
    occupancy: float

    def summary(self) -> dict:
        """Plain numbers about this tomogram (JSON-ready)."""
        names = self.particles.class_names
        counts = np.bincount(self.particles.class_ids, minlength=len(names) + 1)[1:]
        acq = self.acquisition
        return {
            "n_particles": len(self.particles),
            "particles_per_class": {n: int(c) for n, c in zip(names, counts)},
            "occupancy": self.occupancy,
            "bodies": list(self.bodies),
            "noise_sigma": acq.noise_sigma,
            "electrons_per_pixel": acq.electrons_per_pixel,
            "measured_snr": acq.measured_snr,
            "acquisition_order_deg": [float(acq.angles_deg[i]) for i in acq.order],
        }


def _rng(key: jax.Array) -> np.random.Generator:
    """A NumPy generator seeded from a typed JAX key (placement runs in NumPy)."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def _place(canvas: Canvas, rng, label: int, make_body, max_centre=None):
    """Stamp one body drawn by `make_body(rng) -> (density, mask, params)` at a random position
    where it fits; returns (instance id, centre (z, y, x), params) or None if it never fit."""
    shape = np.asarray(canvas.shape)
    for _ in range(_ORIENTATIONS_PER_BODY):
        density, mask, params = make_body(rng)
        lo, hi = mask_bounds(mask)
        half = (np.asarray(mask.shape) - 1) // 2
        # The box is centred on the body: centre - half + lo >= 0 and centre - half + hi <= shape.
        low = half - lo
        high = shape - hi + half  # inclusive
        if np.any(high < low):
            continue
        for _ in range(_POSITIONS_PER_ORIENTATION):
            centre = rng.integers(low, high + 1)
            instance = canvas.try_stamp(density, mask, centre - half, label, (lo, hi))
            if instance:
                return instance, centre, params
    return None


def _template_body(template: Template):
    def make(rng):
        angles = random_euler_zyz(rng, 1)[0]
        density = rotate_volume(template.density, angles)
        mask = rotate_volume(template.mask.astype(np.float32), angles) > 0.5
        return density, mask, angles

    return make


def _place_sample(rng, config: SimulationConfig, templates: list[Template], name, progress):
    canvas = Canvas(config.shape)
    vs = config.voxel_size
    bodies = []

    def record(kind, result, **params):
        if result is not None:
            instance, centre, extra = result
            bodies.append({"kind": kind, "instance": int(instance), "centre_zyx": centre.tolist(),
                           **params, **extra})  # fmt: skip

    for _ in range(config.n_flat_membranes):
        normal = rng.normal(size=3)
        point = rng.uniform(0, 1, 3) * np.asarray(config.shape)
        density, mask = flat_membrane(config.shape, vs, normal, point)
        instance = canvas.try_stamp(density, mask, (0, 0, 0), config.label_of("membrane"))
        if instance:
            bodies.append({"kind": "flat_membrane", "instance": instance,
                           "normal_xyz": (normal / np.linalg.norm(normal)).tolist(),
                           "point_zyx": point.tolist()})  # fmt: skip
    for _ in range(config.n_vesicles):
        radius = float(rng.uniform(*config.vesicle_radius))
        sphere = (*vesicle(radius, vs), {})
        result = _place(canvas, rng, config.label_of("membrane"), lambda r, body=sphere: body)
        record("vesicle", result, radius_angstrom=radius)
    bead = (*gold_bead(config.gold_radius, vs, config.gold_contrast), {})
    for _ in range(config.n_gold):
        result = _place(canvas, rng, config.label_of("gold"), lambda r: bead)
        record("gold", result, radius_angstrom=config.gold_radius)

    particles = _place_particles(rng, canvas, config, templates, name, progress)

    def decoy(r):
        axes = r.uniform(*config.decoy_size, 3)
        if r.uniform() < 0.5:  # a disc: one short axis
            axes[2] = config.decoy_size[0] / 2
        angles = random_euler_zyz(r, 1)[0]
        return (*ellipsoid(axes, angles, vs),
                {"semi_axes_angstrom": axes.tolist(), "angles_deg": angles.tolist()})  # fmt: skip

    for _ in range(config.n_decoys):
        record("decoy", _place(canvas, rng, config.label_of("decoy"), decoy))
    return canvas, particles, tuple(bodies)


def _place_particles(rng, canvas, config, templates, name, progress):
    n_classes = len(templates)
    if config.n_particles is not None:
        # Balanced classes in random order; the largest are tried first so they find room.
        sequence = np.resize(np.arange(n_classes), config.n_particles)
        rng.shuffle(sequence)
        size = np.array([t.n_mask_voxels for t in templates])
        sequence = sequence[np.argsort(-size[sequence], kind="stable")]
        total = config.n_particles
    else:
        sequence = None
        total = math.ceil(config.occupancy * np.prod(config.shape))
    makers = [_template_body(t) for t in templates]
    ids, centres, angles, instances = [], [], [], []
    occupied_before = canvas.n_occupied
    bar = tqdm(total=total, desc="placing particles", unit="particle" if sequence is not None
               else "voxel", disable=not progress, leave=False)  # fmt: skip
    while True:
        placed_voxels = canvas.n_occupied - occupied_before
        if sequence is not None and len(ids) == len(sequence):
            break
        if sequence is None and placed_voxels >= total:
            break
        k = int(sequence[len(ids)] if sequence is not None else rng.integers(n_classes))
        result = _place(canvas, rng, k + 1, makers[k])
        if result is None:
            bar.close()
            reached = (
                f"{len(ids)} of {config.n_particles} particles"
                if sequence is not None
                else f"occupancy {placed_voxels / canvas.instances.size:.3f} of {config.occupancy}"
            )
            raise ValueError(
                f"could not fit a {templates[k].name} particle after {len(ids)} placed "
                f"({reached}) in a {config.shape} volume; lower n_particles / occupancy, "
                "enlarge the volume or place fewer membranes and decoys"
            )
        instance, centre, euler = result
        ids.append(k + 1)
        centres.append(centre)
        angles.append(euler)
        instances.append(instance)
        bar.update(
            1 if sequence is not None else canvas.n_occupied - occupied_before - placed_voxels
        )
    bar.close()
    particles = ParticleList(
        class_names=tuple(t.name for t in templates),
        class_ids=np.asarray(ids, dtype=np.int64),
        positions=np.asarray(centres, dtype=np.float64).reshape(-1, 3),
        angles_deg=np.asarray(angles, dtype=np.float64).reshape(-1, 3),
        voxel_size=config.voxel_size,
        tomo_name=name,
    )
    return particles, np.asarray(instances, dtype=np.int64), canvas.n_occupied - occupied_before


def simulate_tomogram(
    key: jax.Array, config: SimulationConfig, *, name: str = "tomo_000", progress: bool = False
) -> SimulatedTomogram:
    """Simulate one crowded tomogram with its ground truth.

    Args:
        key: typed PRNG key; the same key and config give identical arrays.
        config: the parameters (`SimulationConfig`).
        name: the tomogram's name, written in its particle list (rlnTomoName).
        progress: show a progress bar while particles are placed.

    Returns:
        A `SimulatedTomogram`.
    """
    templates = config.load_templates()
    key_sample, key_acquisition = jax.random.split(key)
    canvas, (particles, instances, particle_voxels), bodies = _place_sample(
        _rng(key_sample), config, templates, name, progress
    )
    geometry = config.geometry()
    acquisition = simulate_tilt_series(
        key_acquisition,
        canvas.density,
        config.voxel_size,
        geometry,
        snr=config.snr,
        noise=config.noise,
        order=config.tilt_order,
        total_dose=config.total_dose,
        ctf=config.ctf_parameters(),
    )
    recorded = acquisition.noisy
    if acquisition.ctf is not None:
        recorded = phase_flip(recorded, acquisition.ctf)
    tomogram = wbp(recorded, TiltProjector(geometry, config.shape), config.wbp_filter).volume
    return SimulatedTomogram(
        config=config,
        ground_truth=canvas.density,
        labels=canvas.labels,
        instances=canvas.instances,
        particles=particles,
        particle_instances=instances,
        bodies=bodies,
        acquisition=acquisition,
        tomogram=np.asarray(tomogram),
        occupancy=particle_voxels / canvas.instances.size,
    )


def dataset_file_names(name: str) -> dict[str, str]:
    """The files `write_dataset` writes for tomogram `name`, by role."""
    suffixes = {
        "tomogram": "tomogram.mrc",
        "ground_truth": "ground_truth.mrc",
        "labels": "labels.mrc",
        "instances": "instances.mrc",
        "tilt_series": "tilt_series.mrc",
        "tilt_series_clean": "tilt_series_clean.mrc",
        "tilt_series_even": "tilt_series_even.mrc",
        "tilt_series_odd": "tilt_series_odd.mrc",
        "angles": "tilt_series.tlt",
        "particles_star": "particles.star",
        "particles_csv": "particles.csv",
        "overview": "overview.png",
    }
    return {role: f"{name}_{suffix}" for role, suffix in suffixes.items()}


def _write_tomogram(folder: Path, sim: SimulatedTomogram, name: str) -> None:
    from ..plot import ortho_slices, save_figure

    files = {role: folder / f for role, f in dataset_file_names(name).items()}
    vs = sim.config.voxel_size
    acq = sim.acquisition
    write_mrc(files["ground_truth"], sim.ground_truth, vs)
    write_mrc(
        files["labels"], sim.labels, vs, dtype=np.int8 if sim.labels.max() < 128 else np.int16
    )
    instance_type = np.uint16 if sim.instances.max() <= np.iinfo(np.uint16).max else np.float32
    write_mrc(files["instances"], sim.instances, vs, dtype=instance_type)
    for role, data in (("tilt_series", acq.noisy), ("tilt_series_clean", acq.clean),
                       ("tilt_series_even", acq.even), ("tilt_series_odd", acq.odd)):  # fmt: skip
        write_mrc(files[role], data, vs)
    write_tilt_angles(files["angles"], acq.angles_deg)
    write_particles_star(files["particles_star"], sim.particles)
    write_particles_csv(files["particles_csv"], sim.particles)
    write_mrc(files["tomogram"], sim.tomogram, vs)
    fig = ortho_slices(
        {"tomogram (WBP)": sim.tomogram, "ground truth": sim.ground_truth, "labels": sim.labels},
        title=f"{name}: {len(sim.particles)} particles, SNR {sim.config.snr:g}, "
        f"tilts {sim.config.tilt_min:g}..{sim.config.tilt_max:g} deg",
        categorical=("labels",),
    )
    # The overview is written last: its presence marks a complete tomogram when resuming.
    save_figure(fig, files["overview"])


def write_dataset(
    out_dir: str | Path,
    config: SimulationConfig,
    n_tomograms: int = 1,
    seed: int = 0,
    *,
    progress: bool = True,
) -> Path:
    """Simulate `n_tomograms` tomograms and write them with their ground truth to `out_dir`.

    Files per tomogram i (name `tomo_{i:03d}`): see `dataset_file_names`; plus `parameters.json`
    with the config, seed, label names and a summary of every tomogram. Tomogram i uses the key
    `fold_in(key(seed), i)`, so datasets are reproducible file for file and a run that stopped
    can be resumed: tomograms whose files are complete are kept (the folder must hold a dataset
    made with the same parameters).

    Returns:
        The folder.
    """
    if n_tomograms < 1:
        raise ValueError(f"n_tomograms must be >= 1, got {n_tomograms}")
    config.load_templates()  # bad classes fail before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header = {"config": config.to_json(), "seed": int(seed), "n_tomograms": int(n_tomograms),
              "label_names": list(config.label_names)}  # fmt: skip
    params_path = out / "parameters.json"
    state_path = out / ".simulation_state.json"
    summaries = {}
    if state_path.exists():
        state = json.loads(state_path.read_text())
        if state["header"] != json.loads(json.dumps(header)):
            raise ValueError(
                f"{out} holds a dataset made with other parameters; choose a new --out folder"
            )
        summaries = state["summaries"]
    elif params_path.exists():
        raise ValueError(f"{out} already holds a finished dataset; choose a new --out folder")

    def save_json(path: Path, obj) -> None:
        atomic_write(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))

    root = jax.random.key(seed)
    for i in tqdm(range(n_tomograms), desc="tomograms", disable=not progress):
        name = f"tomo_{i:03d}"
        done = all((out / f).exists() for f in dataset_file_names(name).values())
        if done and name in summaries:
            continue
        sim = simulate_tomogram(jax.random.fold_in(root, i), config, name=name, progress=progress)
        _write_tomogram(out, sim, name)
        summaries[name] = sim.summary()
        save_json(state_path, {"header": header, "summaries": summaries})
    save_json(params_path, {**header, "tomograms": summaries})
    state_path.unlink()
    return out
