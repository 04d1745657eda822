"""The `cryojax-mw` command: simulate a tilt series, reconstruct it, compare maps, run the demo."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import click
import jax
import jax.numpy as jnp
import numpy as np

from .. import io, metrics, plot, reconstruct, sampling, simulate
from ..denoisers import TVDenoiser, smoothed_tv_norm
from ..operators import (
    FourierMaskOperator,
    TiltGeometry,
    TiltProjector,
    add_gaussian_noise,
    add_poisson_noise,
    ctf_2d,
    estimate_noise_sigma,
    gaussian_sigma_for_snr,
    missing_wedge_mask,
    operator_norm,
    periodic_plus_smooth,
    phase_flip,
    project_observed,
)

METHODS = ("wbp", "sirt", "cgls", "tv")
FILTERS = ("ramp", "shepp-logan", "hann")


class UsageError(click.ClickException):
    """Bad input: printed as one line `error: ...` with exit code 2, never a traceback."""

    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


def _write_json(path: Path, payload: dict) -> None:
    text = json.dumps(payload, indent=2, default=float) + "\n"
    io.atomic_write(path, lambda tmp: tmp.write_text(text))


def _tilt_series_and_angles(
    tilt_series_path: Path, angles_path: Path | None, tilt_range, tilt_step
):
    data, voxel_size = io.read_mrc(tilt_series_path)
    if angles_path is not None:
        angles = io.read_tilt_angles(angles_path)
    elif tilt_range is not None:
        angles = TiltGeometry.from_range(tilt_range[0], tilt_range[1], tilt_step).angles_deg
    else:
        raise UsageError(
            "give the tilt angles: --angles FILE.tlt, or --tilt-range MIN MAX with --tilt-step"
        )
    angles = np.asarray(angles, dtype=np.float64)
    if data.shape[0] != len(angles):
        raise UsageError(
            f"the tilt series has {data.shape[0]} images but {len(angles)} tilt angles were given"
        )
    return data, voxel_size, TiltGeometry(angles)


def _figure(volumes: dict, path: Path, title: str) -> Path:
    return plot.save_figure(plot.ortho_slices(volumes, title=title), path)


def _stack(*options):
    """One decorator applying several click options, in the order listed (as in --help)."""

    def apply(command):
        for option in reversed(options):
            command = option(command)
        return command

    return apply


# --tilt-range and --tilt-step of the commands that simulate an acquisition.
_tilt_scheme_options = _stack(
    click.option(
        "--tilt-range", type=float, nargs=2, default=(-60.0, 60.0), show_default=True,
        metavar="MIN MAX", help="First and last tilt angle in degrees.",
    ),
    click.option(
        "--tilt-step", type=float, default=2.0, show_default=True, help="Tilt increment in degrees."
    ),
)  # fmt: skip

# The tilt series and its angles, for the commands that read one.
_tilt_series_input_options = _stack(
    click.option(
        "--tilt-series", "tilt_series_path", type=click.Path(dir_okay=False, path_type=Path),
        required=True, help="MRC stack (n_tilts, y, x), or a 2D sinogram (n_tilts, x).",
    ),
    click.option(
        "--angles", "angles_path", type=click.Path(dir_okay=False, path_type=Path),
        help="IMOD .tlt file, one angle (degrees) per line, in the stack's order.",
    ),
    click.option(
        "--tilt-range", type=float, nargs=2, metavar="MIN MAX",
        help="Instead of --angles: evenly spaced angles from MIN to MAX degrees.",
    ),
    click.option(
        "--tilt-step", type=float, default=2.0, show_default=True, help="Step for --tilt-range."
    ),
    click.option(
        "--thickness", type=int, help="Tomogram size along z in voxels [default: the x size]."
    ),
)  # fmt: skip


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="cryojax_mw")
def cli():
    """Cryo-electron tomography with JAX: exact tilt operators, reconstruction, uncertainty.

    \b
    Conventions: volumes are (z, y, x) with z the beam direction at 0 deg and y the tilt axis;
    a tilt series is (n_tilts, y, x) in one MRC stack; angles are in degrees (IMOD .tlt files,
    one angle per line); voxel sizes are in Angstrom and travel in the MRC headers.

    \b
    A first session:
      cryojax-mw simulate --out sim --shape 64 64 64
      cryojax-mw reconstruct --tilt-series sim/tilt_series.mrc --angles sim/angles.tlt \\
          --thickness 64 --method sirt --out sim/sirt.mrc
      cryojax-mw fsc sim/sirt.mrc sim/ground_truth.mrc
    or everything at once on a built-in example:  cryojax-mw demo --out demo_output
    """


@cli.command("simulate")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for ground_truth.mrc, tilt_series.mrc, tilt_series_clean.mrc, angles.tlt, "
    "simulation.json and overview.png.",
)
@click.option(
    "--shape",
    type=int,
    nargs=3,
    default=(64, 64, 64),
    show_default=True,
    metavar="Z Y X",
    help="Volume size in voxels (z is the beam direction).",
)
@click.option(
    "--phantom",
    type=click.Choice(["shepp-logan", "blobs"]),
    default="shepp-logan",
    show_default=True,
    help="What to image: a 3D Shepp-Logan phantom or random Gaussian blobs.",
)
@_tilt_scheme_options
@click.option(
    "--noise",
    type=click.Choice(["gaussian", "poisson", "none"]),
    default="gaussian",
    show_default=True,
    help="Noise model of the detector.",
)
@click.option(
    "--snr",
    type=float,
    default=0.1,
    show_default=True,
    help="Gaussian noise: signal variance / noise variance (cryo-ET data: 0.01-0.1).",
)
@click.option(
    "--dose",
    type=float,
    default=100.0,
    show_default=True,
    help="Poisson noise: electrons per pixel per tilt.",
)
@click.option(
    "--voxel-size", type=float, default=10.0, show_default=True, help="Angstrom per voxel."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same files.")
def simulate_cmd(
    out_dir, shape, phantom, tilt_range, tilt_step, noise, snr, dose, voxel_size, seed
):
    """Make a phantom and its noisy tilt series (with a missing wedge) from nothing.

    The tilt series is the phantom projected by the Joseph tilt projector at each angle, plus noise.
    Use its outputs as input to `reconstruct` and compare with `fsc`.
    """
    geometry = TiltGeometry.from_range(tilt_range[0], tilt_range[1], tilt_step)
    if snr <= 0 or dose <= 0 or voxel_size <= 0:
        raise UsageError("--snr, --dose and --voxel-size must be positive")
    key_phantom, key_noise = jax.random.split(jax.random.key(seed))
    if phantom == "shepp-logan":
        truth = simulate.shepp_logan(shape)
    else:
        truth = simulate.random_blobs(key_phantom, shape, n_blobs=12)
    projector = TiltProjector(geometry, shape)
    clean = projector.mv(truth)
    if noise == "gaussian":
        noisy = add_gaussian_noise(key_noise, clean, gaussian_sigma_for_snr(clean, snr))
    elif noise == "poisson":
        # Line integrals in voxels are large; scale to a typical attenuation of order one.
        scale = 1.0 / float(np.max(np.asarray(clean)))
        noisy = add_poisson_noise(key_noise, clean * scale, dose) / scale
    else:
        noisy = clean
    out_dir.mkdir(parents=True, exist_ok=True)
    io.write_mrc(out_dir / "ground_truth.mrc", np.asarray(truth), voxel_size)
    io.write_mrc(out_dir / "tilt_series.mrc", np.asarray(noisy), voxel_size)
    io.write_mrc(out_dir / "tilt_series_clean.mrc", np.asarray(clean), voxel_size)
    io.write_tilt_angles(out_dir / "angles.tlt", geometry.angles_deg)
    _write_json(
        out_dir / "simulation.json",
        {
            "shape_zyx": list(shape),
            "phantom": phantom,
            "tilt_range_deg": list(tilt_range),
            "tilt_step_deg": tilt_step,
            "n_tilts": geometry.n_tilts,
            "noise": noise,
            "snr": snr,
            "dose_electrons_per_pixel": dose,
            "voxel_size_angstrom": voxel_size,
            "seed": seed,
        },
    )
    fig_path = plot.save_figure(
        plot.ortho_slices({"ground truth": np.asarray(truth)}, title="simulated phantom"),
        out_dir / "overview.png",
    )
    click.echo(
        f"wrote {geometry.n_tilts} tilts of a {'x'.join(map(str, shape))} {phantom} phantom to "
        f"{out_dir}/ (figure: {fig_path.name})"
    )


# --voltage, --cs and --amplitude-contrast: the CTF's microscope, shared by the commands.
_microscope_options = _stack(
    click.option("--voltage", type=float, default=300.0, show_default=True, help="CTF: kV."),
    click.option(
        "--cs", type=float, default=2.7, show_default=True, help="CTF: spherical aberration, mm."
    ),
    click.option(
        "--amplitude-contrast", type=float, default=0.07, show_default=True,
        help="CTF: amplitude contrast fraction.",
    ),
)  # fmt: skip


def _list_classes(ctx, _param, value):
    """--list-classes: print the shipped (or --templates) class names and stop."""
    if not value or ctx.resilient_parsing:
        return
    folder = ctx.params.get("templates")
    click.echo(" ".join(simulate.available_templates(folder)))
    ctx.exit()


@cli.command("simulate-dataset")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for the dataset: tomo_000_tomogram.mrc, tomo_000_labels.mrc, "
    "tomo_000_particles.star, ... and parameters.json. A run that stopped resumes here.",
)
@click.option("--n-tomograms", type=int, default=1, show_default=True)
@click.option(
    "--shape",
    type=int,
    nargs=3,
    default=(64, 128, 128),
    show_default=True,
    metavar="Z Y X",
    help="Tomogram size in voxels (z is the beam direction).",
)
@click.option(
    "--voxel-size", type=float, default=10.0, show_default=True, help="Angstrom per voxel."
)
@click.option(
    "--templates",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    is_eager=True,
    help="Folder of MRC density maps to use instead of the ones shipped with the package.",
)
@click.option(
    "--list-classes",
    is_flag=True,
    expose_value=False,
    callback=_list_classes,
    help="Print the available class names and exit.",
)
@click.option(
    "--classes",
    default=",".join(simulate.SHREC_CLASSES),
    show_default=True,
    help="Comma-separated template names (see --list-classes).",
)
@click.option(
    "--n-particles",
    type=int,
    help="Exact number of particles, classes balanced [default: fill to --occupancy].",
)
@click.option(
    "--occupancy",
    type=float,
    default=0.05,
    show_default=True,
    help="Fraction of the volume covered by particle shapes, when --n-particles is not given.",
)
@click.option("--vesicles", type=int, default=1, show_default=True, help="Spherical vesicles.")
@click.option(
    "--membranes", type=int, default=0, show_default=True, help="Flat membranes across the volume."
)
@click.option("--gold", type=int, default=2, show_default=True, help="Gold fiducials (10 nm).")
@click.option(
    "--decoys", type=int, default=10, show_default=True, help="Ellipsoids and discs (distractors)."
)
@click.option(
    "--snr",
    type=float,
    default=0.1,
    show_default=True,
    help="Signal variance / noise variance of the tilt series (cryo-ET: 0.01-0.1).",
)
@click.option(
    "--noise", type=click.Choice(simulate.NOISE_MODELS), default="gaussian", show_default=True
)
@_tilt_scheme_options
@click.option(
    "--tilt-order",
    type=click.Choice(simulate.TILT_ORDERS),
    default="dose-symmetric",
    show_default=True,
    help="Acquisition order (sets how much dose each tilt has seen).",
)
@click.option(
    "--dose",
    type=float,
    default=100.0,
    show_default=True,
    help="Total electron dose in e/Å² for radiation damage (0 turns it off).",
)
@click.option("--ctf/--no-ctf", default=False, show_default=True, help="Apply a CTF.")
@click.option(
    "--defocus", type=float, default=3.0, show_default=True, help="CTF underfocus, micrometres."
)
@_microscope_options
@click.option(
    "--filter",
    "filter_name",
    type=click.Choice(FILTERS),
    default="hann",
    show_default=True,
    help="WBP filter of the tomogram.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same files.")
def simulate_dataset_cmd(out_dir, n_tomograms, shape, voxel_size, templates, classes, n_particles,
                         occupancy, vesicles, membranes, gold, decoys, snr, noise, tilt_range,
                         tilt_step, tilt_order, dose, ctf, defocus, voltage, cs,
                         amplitude_contrast, filter_name, seed):  # fmt: skip
    """Crowded synthetic tomograms from real density maps, with their ground truth.

    Each tomogram holds macromolecules at random positions and uniformly random orientations
    (RELION ZYZ Euler angles) without overlap, vesicles, flat membranes, gold beads and decoys;
    its tilt series is projected, damaged by the dose, optionally CTF-modulated, made noisy at
    the requested SNR and reconstructed by WBP (missing wedge included).

    \b
    Per tomogram:  tomogram, ground_truth, labels (class per voxel), instances (object per
    voxel), tilt_series (+ _clean, _even, _odd halves, .tlt), particles.star / .csv
    (RELION: rlnCoordinateX = array axis 2), overview.png.   Per dataset: parameters.json.

    \b
    Example (the SHREC-like benchmark size):
      cryojax-mw simulate-dataset --out shrec --n-tomograms 4 --shape 200 512 512 \\
          --n-particles 1500 --snr 0.1 --tilt-range -60 60 --tilt-step 2 --ctf --seed 1
    """
    names = tuple(c.strip() for c in classes.split(",") if c.strip())
    config = simulate.SimulationConfig(
        shape=shape,
        voxel_size=voxel_size,
        classes=names,
        n_particles=n_particles,
        occupancy=None if n_particles is not None else occupancy,
        n_vesicles=vesicles,
        n_flat_membranes=membranes,
        n_gold=gold,
        n_decoys=decoys,
        templates=None if templates is None else str(templates),
        tilt_min=tilt_range[0],
        tilt_max=tilt_range[1],
        tilt_step=tilt_step,
        tilt_order=tilt_order,
        snr=snr,
        noise=noise,
        total_dose=dose,
        defocus=defocus if ctf else None,
        voltage=voltage,
        cs=cs,
        amplitude_contrast=amplitude_contrast,
        wbp_filter=filter_name,
    )
    start = time.perf_counter()
    simulate.write_dataset(out_dir, config, n_tomograms=n_tomograms, seed=seed)
    summary = json.loads((out_dir / "parameters.json").read_text())["tomograms"]
    n_total = sum(t["n_particles"] for t in summary.values())
    snrs = ", ".join(f"{t['measured_snr']:.3g}" for t in summary.values())
    click.echo(
        f"wrote {n_tomograms} tomogram(s) with {n_total} particles of {len(names)} classes to "
        f"{out_dir}/ in {time.perf_counter() - start:.0f} s (measured SNR: {snrs}); "
        "see tomo_000_overview.png"
    )


def run_reconstruction(
    method, tilt_series, projector, *, iterations, lam, filter_name, nonnegative, progress
):
    """Dispatch one reconstruction method by name (shared by `reconstruct` and `demo`)."""
    if method == "wbp":
        return reconstruct.wbp(tilt_series, projector, filter=filter_name)
    if method == "sirt":
        return reconstruct.sirt(
            tilt_series, projector, iterations, nonnegative=nonnegative, progress=progress
        )
    if method == "cgls":
        return reconstruct.cgls(tilt_series, projector, iterations, progress=progress)
    return reconstruct.tv_map(
        tilt_series, projector, lam, iterations, nonnegative=nonnegative, progress=progress
    )


@cli.command("reconstruct")
@_tilt_series_input_options
@click.option(
    "--method",
    type=click.Choice(METHODS),
    default="wbp",
    show_default=True,
    help="wbp: weighted backprojection (one pass); sirt / cgls: iterative least squares; "
    "tv: total-variation regularised MAP (edges kept, noise removed).",
)
@click.option(
    "--iterations", type=int, default=50, show_default=True, help="Iterations of sirt/cgls/tv."
)
@click.option(
    "--lam",
    type=float,
    default=0.1,
    show_default=True,
    help="tv: regularisation weight relative to the noise scale of the data, "
    "std(tilt series) * sqrt(n_tilts * thickness); larger = smoother.",
)
@click.option(
    "--filter",
    "filter_name",
    type=click.Choice(FILTERS),
    default="ramp",
    show_default=True,
    help="wbp: ramp filter window.",
)
@click.option(
    "--nonnegative/--allow-negative",
    default=False,
    show_default=True,
    help="sirt/tv: keep voxel values >= 0.",
)
@click.option(
    "--phase-flip",
    "phase_flip_um",
    type=float,
    metavar="DEFOCUS_UM",
    help="CTF correction first: flip the phases of each tilt for this underfocus (micrometres), "
    "as a tilt series from `simulate-dataset --ctf` needs.",
)
@_microscope_options
@click.option("--voxel-size", type=float, help="Angstrom per voxel if the MRC header has none.")
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Output tomogram (.mrc); OUT.json gets the residuals and OUT.png the ortho-slices.",
)
def reconstruct_cmd(
    tilt_series_path,
    angles_path,
    tilt_range,
    tilt_step,
    thickness,
    method,
    iterations,
    lam,
    filter_name,
    nonnegative,
    phase_flip_um,
    voltage,
    cs,
    amplitude_contrast,
    voxel_size,
    out_path,
):
    """Reconstruct a tomogram from a tilt series and its angles."""
    io.check_output_not_input(
        out_path, *[p for p in (tilt_series_path, angles_path) if p is not None]
    )
    data, header_voxel, geometry = _tilt_series_and_angles(
        tilt_series_path, angles_path, tilt_range, tilt_step
    )
    voxel = voxel_size or header_voxel
    if iterations < 1:
        raise UsageError("--iterations must be at least 1")
    if lam < 0:
        raise UsageError("--lam must be >= 0")
    nx = data.shape[-1]
    nz = thickness or nx
    if nz < 1:
        raise UsageError("--thickness must be at least 1")
    shape = (nz, nx) if data.ndim == 2 else (nz, data.shape[1], nx)
    if phase_flip_um is not None:
        if data.ndim != 3:
            raise UsageError("--phase-flip needs a tilt series of images (n_tilts, y, x)")
        if voxel is None:
            raise UsageError("--phase-flip needs the pixel size: give --voxel-size")
        ctf = ctf_2d(data.shape[1:], voxel, phase_flip_um, voltage_kv=voltage, cs_mm=cs,
                     amplitude_contrast=amplitude_contrast)  # fmt: skip
        data = np.asarray(phase_flip(data, ctf))
    projector = TiltProjector(geometry, shape)
    scaled_lam = reconstruct.tv_weight(lam, data, nz)
    start = time.perf_counter()
    result = run_reconstruction(
        method,
        data,
        projector,
        iterations=iterations,
        lam=scaled_lam,
        filter_name=filter_name,
        nonnegative=nonnegative,
        progress=True,
    )
    volume = np.asarray(result.volume)
    seconds = time.perf_counter() - start
    io.write_mrc(out_path, volume, voxel)
    _write_json(
        out_path.with_suffix(".json"),
        {
            "method": method,
            "shape_zyx": list(shape),
            "n_tilts": geometry.n_tilts,
            "angles_deg": list(geometry.angles_deg),
            "iterations": 1 if method == "wbp" else iterations,
            "lam": scaled_lam if method == "tv" else None,
            "seconds": seconds,
            "residuals": np.asarray(result.residuals).tolist(),
            "voxel_size_angstrom": voxel,
            "tilt_series": str(tilt_series_path),
            "phase_flip_defocus_um": phase_flip_um,
        },
    )
    _figure({method: volume}, out_path.with_suffix(".png"), f"{method} reconstruction")
    click.echo(
        f"{method}: {'x'.join(map(str, shape))} tomogram in {seconds:.1f} s, final relative "
        f"residual {float(result.residuals[-1]):.4f} -> {out_path}"
    )


SAMPLERS = ("mwr", "myula", "pnp-ula", "ula", "mala")


# Options shared by `restore` and `sample-tilt-series`: chains, lengths, seed, output.
_sampling_options = _stack(
    click.option("--chains", type=int, default=8, show_default=True, help="Chains run in one vmap."),
    click.option(
        "--samples", type=int, default=300, show_default=True,
        help="Steps kept per chain after burn-in.",
    ),
    click.option(
        "--burn-in", type=int, default=100, show_default=True,
        help="Steps discarded at the start of each chain.",
    ),
    click.option(
        "--level", type=float, default=0.9, show_default=True,
        help="Probability of the per-voxel credible interval.",
    ),
    click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same files."),
    click.option(
        "--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True,
        help="Folder for mean.mrc, std.mrc, ci_low.mrc, ci_high.mrc, diagnostics.json and a "
        "PNG; an interrupted run resumes from its checkpoint there.",
    ),
)  # fmt: skip


def _check_sampling(chains, samples, burn_in, level) -> None:
    if chains < 1:
        raise UsageError("--chains must be at least 1")
    if samples < 4:
        raise UsageError("--samples must be at least 4")
    if burn_in < 0:
        raise UsageError("--burn-in must be >= 0")
    if not 0 < level < 1:
        raise UsageError("--level must lie in (0, 1)")


def _write_posterior(out_dir, summary, voxel, offset, scale, extra: dict, figure_input, title):
    """Write the posterior summary in data units (x = offset + scale * sample)."""
    maps = {
        "mean": offset + scale * summary.mean,
        "std": scale * summary.std,
        "ci_low": offset + scale * summary.ci_low,
        "ci_high": offset + scale * summary.ci_high,
    }
    if summary.map_estimate is not None:
        maps["most_visited"] = offset + scale * summary.map_estimate
    for name, volume in maps.items():
        io.write_mrc(out_dir / f"{name}.mrc", volume, voxel)
    _write_json(
        out_dir / "diagnostics.json",
        {
            **extra,
            "chains": summary.num_chains,
            "kept_per_chain": summary.num_kept,
            "level": summary.level,
            "acceptance_rate_per_chain": summary.acceptance_rate.tolist(),
            "diagnostics": summary.diagnostics,
        },
    )
    _figure(
        {"input": figure_input, "posterior mean": maps["mean"], "posterior std": maps["std"]},
        out_dir / "posterior.png",
        title,
    )
    return maps


def _run_sampler(out_dir, seed, algorithm, starts, samples, burn_in, level):
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / "checkpoint.npz"
    summary = sampling.run_chains(
        jax.random.key(seed), algorithm, starts, burn_in + samples, burn_in, level=level,
        checkpoint=checkpoint, progress=True,
    )  # fmt: skip
    return summary, checkpoint


@cli.command("restore")
@click.option(
    "--tomogram", "tomogram_path", type=click.Path(dir_okay=False, path_type=Path), required=True,
    help="MRC volume (z, y, x) or image (z, x) whose missing wedge is to be restored.",
)  # fmt: skip
@click.option(
    "--tilt-range", type=float, nargs=2, metavar="MIN MAX",
    help="Tilt range of the acquisition in degrees (sets the wedge).",
)  # fmt: skip
@click.option(
    "--angles", "angles_path", type=click.Path(dir_okay=False, path_type=Path),
    help="Instead of --tilt-range: the IMOD .tlt file of the acquisition (its extremes are used).",
)  # fmt: skip
@click.option("--sampler", type=click.Choice(SAMPLERS), default="mwr", show_default=True,
              help="mwr: Metropolis-Hastings restoration (thesis ch. 2); myula: Langevin with a TV "
              "prior; pnp-ula: Langevin with a TV-denoiser prior; ula / mala: Langevin with a "
              "smoothed TV prior.")  # fmt: skip
@click.option("--tv", type=float, default=0.5, show_default=True,
              help="TV strength in units of the tomogram's standard deviation (mwr: the "
              "denoiser's weight; Langevin: the prior's weight times the noise variance).")  # fmt: skip
# Defaults from dataset A (paper section 4): smaller perturbations restore better (sigma_eps
# 0.3 std ~ the best measured), and beta only sets the speed above a cliff near 1e-3.
@click.option("--sigma-eps", type=float, default=0.3, show_default=True,
              help="mwr: perturbation size in units of the tomogram's standard deviation.")  # fmt: skip
@click.option("--beta", type=float, default=3e-3, show_default=True,
              help="mwr: temperature per voxel in units of the tomogram's variance; larger "
              "accepts more (below about 1e-3 chains stay where they start).")  # fmt: skip
@click.option("--noise-sigma", type=float,
              help="Langevin samplers: noise standard deviation of the tomogram [default: "
              "estimated from the data].")  # fmt: skip
@_sampling_options
def restore_cmd(tomogram_path, tilt_range, angles_path, sampler, tv, sigma_eps, beta, noise_sigma,
                chains, samples, burn_in, level, seed, out_dir):  # fmt: skip
    """Restore a tomogram's missing wedge with error bars: posterior mean, per-voxel std and
    credible intervals from many chains.

    The tomogram is split into its periodic and smooth parts (Moisan 2011); the periodic part is
    normalised (zero mean, unit variance) and sampled; outputs are put back in the tomogram's
    units. Check diagnostics.json: split R-hat near 1 (below 1.05) and ESS in the hundreds mean
    the chains agree.

    \b
    Example:
      cryojax-mw restore --tomogram tomo.mrc --tilt-range -60 60 --chains 8 --samples 300 \\
          --burn-in 100 --out restored
    """
    io.check_output_not_input(out_dir / "mean.mrc", tomogram_path)
    _check_sampling(chains, samples, burn_in, level)
    data, voxel = io.read_mrc(tomogram_path)
    if data.ndim not in (2, 3):
        raise UsageError(f"the tomogram must be 2D or 3D, got shape {data.shape}")
    if angles_path is not None:
        angles = io.read_tilt_angles(angles_path)
        tilt_range = (float(np.min(angles)), float(np.max(angles)))
    if tilt_range is None:
        raise UsageError("give the acquisition's tilt range: --tilt-range MIN MAX or --angles FILE")
    for name, value in (("--tv", tv), ("--sigma-eps", sigma_eps), ("--beta", beta)):
        if not value > 0:
            raise UsageError(f"{name} must be > 0")
    mask = missing_wedge_mask(data.shape, tilt_range[0], tilt_range[1])
    periodic, smooth = (np.asarray(a) for a in periodic_plus_smooth(data))
    offset, scale = float(periodic.mean()), float(periodic.std())
    if not scale > 0:
        raise UsageError("the tomogram is constant: there is nothing to restore")
    y = jnp.asarray((periodic - offset) / scale)
    n_voxels = y.size
    denoiser = TVDenoiser(tv, 10)
    key_start = jax.random.fold_in(jax.random.key(seed), 2**31 - 1)

    def denoised_start(key):
        # Chains start from denoised data with their own perturbation (not at y itself, the
        # minimum of the L2 fidelity).
        noisy = project_observed(y + sigma_eps * jax.random.normal(key, y.shape), y, mask)
        return TVDenoiser(tv, 50)(noisy, denoiser.init_state(y))[0]

    starts = jax.vmap(denoised_start)(jax.random.split(key_start, chains))
    if sampler == "mwr":
        algorithm = sampling.mwr(y, mask, denoiser, sigma_eps, beta * n_voxels)
        parameters = {"tv": tv, "sigma_eps": sigma_eps, "beta": beta * n_voxels}
    else:
        sigma = (noise_sigma / scale) if noise_sigma else estimate_noise_sigma(y)
        seen = FourierMaskOperator(mask, y.shape, y.dtype)

        def loglik(x):
            return -0.5 * jnp.sum((seen.mv(x) - y) ** 2) / sigma**2

        weight = tv / sigma**2
        step = 0.2 * sigma**2
        if sampler == "myula":
            algorithm = sampling.myula(loglik, weight, sigma**2, step)
        elif sampler == "pnp-ula":
            tv_denoiser = TVDenoiser(tv * sigma, 20)
            algorithm = sampling.pnp_ula(
                loglik, lambda x: tv_denoiser(x, tv_denoiser.init_state(x))[0], sigma, step
            )
        else:
            eps = 0.1

            def logdensity(x):
                return loglik(x) - weight * smoothed_tv_norm(x, eps)

            algorithm = (sampling.ula if sampler == "ula" else sampling.mala)(logdensity, step)
        parameters = {"tv": tv, "noise_sigma": sigma * scale, "step_size": step}
    summary, checkpoint = _run_sampler(out_dir, seed, algorithm, starts, samples, burn_in, level)
    _write_posterior(
        out_dir, summary, voxel, np.asarray(smooth) + offset, scale,
        {"sampler": sampler, "tomogram": str(tomogram_path), "tilt_range_deg": list(tilt_range),
         "parameters": parameters},
        data, f"{sampler}: {tomogram_path.name}",
    )  # fmt: skip
    checkpoint.unlink(missing_ok=True)
    click.echo(
        f"{sampler}: {chains} chains x {samples} kept steps; acceptance "
        f"{float(np.mean(summary.acceptance_rate)):.2f}; max split R-hat "
        f"{summary.diagnostics['voxel_rhat_max']:.3f} -> {out_dir}/"
    )


@cli.command("sample-tilt-series")
@_tilt_series_input_options
@click.option("--sampler", type=click.Choice(("myula", "ula", "mala")), default="myula",
              show_default=True, help="myula: Langevin with a TV prior; ula / mala: with a "
              "smoothed TV prior.")  # fmt: skip
@click.option("--tv", type=float, default=1.0, show_default=True,
              help="TV prior weight in units of 1 / (noise sigma x the WBP's standard "
              "deviation); larger = smoother.")  # fmt: skip
@click.option(
    "--noise-sigma",
    type=float,
    help="Noise standard deviation of the tilt series [default: estimated].",
)
@_sampling_options
def sample_tilt_series_cmd(tilt_series_path, angles_path, tilt_range, tilt_step, thickness,
                           sampler, tv, noise_sigma, chains, samples, burn_in, level, seed,
                           out_dir):  # fmt: skip
    """Sample the tomogram's posterior given the tilt series itself (the projection-domain
    likelihood with the exact tilt projector), with a TV prior: posterior mean, per-voxel std and
    credible intervals."""
    io.check_output_not_input(out_dir / "mean.mrc", tilt_series_path)
    _check_sampling(chains, samples, burn_in, level)
    data, voxel, geometry = _tilt_series_and_angles(
        tilt_series_path, angles_path, tilt_range, tilt_step
    )
    nx = data.shape[-1]
    nz = thickness or nx
    shape = (nz, nx) if data.ndim == 2 else (nz, data.shape[1], nx)
    projector = TiltProjector(geometry, shape)
    b = jnp.asarray(data)
    sigma = noise_sigma or estimate_noise_sigma(data)
    if not sigma > 0:
        raise UsageError("--noise-sigma must be > 0 (or the data are noise-free: give it)")
    start = reconstruct.wbp(b, projector, "hann").volume
    scale = float(jnp.std(start)) or 1.0
    lipschitz = operator_norm(jax.random.key(seed), projector, 30) ** 2 / sigma**2
    step = 0.4 / lipschitz
    loglik = sampling.gaussian_loglikelihood(projector, b, sigma)
    weight = tv / (sigma * scale)
    if sampler == "myula":
        algorithm = sampling.myula(loglik, weight, 1.0 / lipschitz, step)
    else:

        def logdensity(x):
            return loglik(x) + -weight * smoothed_tv_norm(x, 0.01 * scale)

        algorithm = (sampling.ula if sampler == "ula" else sampling.mala)(logdensity, step)
    noise = jax.random.normal(jax.random.key(seed + 1), (chains, *shape), start.dtype)
    starts = start + 0.1 * scale * noise
    summary, checkpoint = _run_sampler(out_dir, seed, algorithm, starts, samples, burn_in, level)
    _write_posterior(
        out_dir, summary, voxel, 0.0, 1.0,
        {"sampler": sampler, "tilt_series": str(tilt_series_path), "shape_zyx": list(shape),
         "parameters": {"tv_weight": weight, "noise_sigma": sigma, "step_size": step}},
        np.asarray(start), f"{sampler} posterior from {tilt_series_path.name}",
    )  # fmt: skip
    checkpoint.unlink(missing_ok=True)
    click.echo(
        f"{sampler}: {chains} chains x {samples} kept steps on a {'x'.join(map(str, shape))} "
        f"tomogram; max split R-hat {summary.diagnostics['voxel_rhat_max']:.3f} -> {out_dir}/"
    )


@cli.command("fsc")
@click.argument("map_a", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("map_b", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--voxel-size", type=float, help="Angstrom per voxel [default: from MAP_A's header].")
@click.option(
    "--out",
    "out_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the curve to this JSON file and a plot beside it (.png).",
)
def fsc_cmd(map_a, map_b, voxel_size, out_path):
    """Fourier shell correlation of two maps, with the 0.143 and 0.5 resolutions.

    Use two independent half-maps (0.143 criterion) or a map and a reference (0.5 criterion).
    """
    if out_path is not None:
        io.check_output_not_input(out_path, map_a, map_b)
    a, va = io.read_mrc(map_a)
    b, _ = io.read_mrc(map_b)
    if a.shape != b.shape:
        raise UsageError(f"the maps differ in shape: {a.shape} vs {b.shape}")
    voxel = voxel_size or va
    res = metrics.fsc(a, b, voxel_size=voxel)
    unit = "Å" if voxel else "voxels"
    click.echo(f"resolution at FSC 0.143: {float(res.resolution_0143):.2f} {unit}")
    click.echo(f"resolution at FSC 0.5:   {float(res.resolution_05):.2f} {unit}")
    if out_path is not None:
        _write_json(
            out_path,
            {
                "map_a": str(map_a),
                "map_b": str(map_b),
                "voxel_size_angstrom": voxel,
                "frequency": np.asarray(res.frequency).tolist(),
                "fsc": np.asarray(res.fsc).tolist(),
                "resolution_0143": float(res.resolution_0143),
                "resolution_05": float(res.resolution_05),
            },
        )
        plot.save_figure(
            plot.fsc_curves(
                {f"{map_a.name} vs {map_b.name}": res}, unit="1/Å" if voxel else "1/voxel"
            ),
            out_path.with_suffix(".png"),
        )


@cli.command("demo")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("demo_output"),
    show_default=True,
    help="Folder for every output.",
)
@click.option(
    "--size", type=int, default=64, show_default=True, help="Cubic phantom size in voxels."
)
@click.option("--seed", type=int, default=0, show_default=True)
def demo_cmd(out_dir, size, seed):
    """The main job on a built-in example: simulate, reconstruct four ways, compare with the truth.

    A 3D Shepp-Logan phantom is imaged from -60 to +60 deg every 2 deg at SNR 1, then
    reconstructed by WBP, SIRT, CGLS and TV-MAP. Writes each tomogram (.mrc), metrics.json (PSNR,
    SSIM, FSC resolution against the truth), demo.png (ortho-slices) and fsc.png.
    """
    shape = (size, size, size)
    geometry = TiltGeometry.from_range(-60.0, 60.0, 2.0)
    projector = TiltProjector(geometry, shape)
    truth = simulate.shepp_logan(shape)
    clean = projector.mv(truth)
    snr = 1.0
    data = add_gaussian_noise(jax.random.key(seed), clean, gaussian_sigma_for_snr(clean, snr))
    out_dir.mkdir(parents=True, exist_ok=True)
    voxel = 10.0
    io.write_mrc(out_dir / "ground_truth.mrc", np.asarray(truth), voxel)
    io.write_mrc(out_dir / "tilt_series.mrc", np.asarray(data), voxel)
    io.write_tilt_angles(out_dir / "angles.tlt", geometry.angles_deg)
    # Iterations stop early on purpose: SIRT and CGLS fit the noise if run to convergence.
    settings = {
        "wbp": dict(iterations=1),
        "sirt": dict(iterations=20),
        "cgls": dict(iterations=4),
        "tv": dict(iterations=150),
    }
    lam = reconstruct.tv_weight(0.1, data, size)
    volumes, report, curves = {"ground truth": np.asarray(truth)}, {}, {}
    for method, opts in settings.items():
        start = time.perf_counter()
        result = run_reconstruction(
            method,
            data,
            projector,
            iterations=opts["iterations"],
            lam=lam,
            filter_name="hann",
            nonnegative=method in ("sirt", "tv"),
            progress=True,
        )
        volume = np.asarray(jax.block_until_ready(result.volume))
        seconds = time.perf_counter() - start
        io.write_mrc(out_dir / f"{method}.mrc", volume, voxel)
        res = metrics.fsc(volume, truth, voxel_size=voxel)
        curves[method] = res
        volumes[method] = volume
        report[method] = {
            "iterations": opts["iterations"],
            "seconds": seconds,
            "psnr_db": float(metrics.psnr(volume, truth)),
            "ssim": float(metrics.ssim(volume, truth)),
            "fsc_0.5_resolution_angstrom": float(res.resolution_05),
            "final_relative_residual": float(result.residuals[-1]),
        }
        click.echo(
            f"  {method:5s} PSNR {report[method]['psnr_db']:6.2f} dB  SSIM "
            f"{report[method]['ssim']:.3f}  FSC0.5 {report[method]['fsc_0.5_resolution_angstrom']:.1f} Å"
            f"  ({seconds:.1f} s)"
        )
    _write_json(
        out_dir / "metrics.json",
        {
            "shape_zyx": list(shape),
            "tilt_range_deg": [-60, 60],
            "tilt_step_deg": 2,
            "snr": snr,
            "methods": report,
        },
    )
    _figure(volumes, out_dir / "demo.png", f"Shepp-Logan, ±60° tilt series at SNR {snr:g}")
    plot.save_figure(
        plot.fsc_curves(curves, title="FSC against the ground truth"), out_dir / "fsc.png"
    )
    click.echo(f"wrote tomograms, metrics.json, demo.png and fsc.png to {out_dir}/")


def main(argv=None) -> None:
    """Entry point: bad input becomes one `error:` line and a non-zero exit, never a traceback."""
    try:
        cli.main(args=argv, prog_name="cryojax-mw", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (ValueError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
