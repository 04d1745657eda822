"""Regenerate the paper's figures and tables from the package (`make paper`).

Figures 1 and 2 and Table 1 come from a fresh run of the reconstructions, Figure 3 from the
simulator; Table 2 is rendered from
the committed projector benchmark results (rerun `make bench` to refresh those).
"""

import json
from pathlib import Path

import jax
import numpy as np

import cryojax_mw as cm
from cryojax_mw import io, metrics, plot, reconstruct, simulate
from cryojax_mw.operators import add_gaussian_noise, gaussian_sigma_for_snr

HERE = Path(__file__).resolve().parent
FIGURES = HERE / "figures"


def _write_text(path: Path, text: str) -> None:
    io.atomic_write(path, lambda tmp: tmp.write_text(text))


def reconstructions(size: int = 64, seed: int = 0) -> None:
    shape = (size, size, size)
    geometry = cm.TiltGeometry.from_range(-60, 60, 2)
    projector = cm.TiltProjector(geometry, shape)
    truth = simulate.shepp_logan(shape)
    clean = projector.mv(truth)
    data = add_gaussian_noise(jax.random.key(seed), clean, gaussian_sigma_for_snr(clean, 1.0))
    lam = reconstruct.tv_weight(0.1, data, size)
    results = {
        "WBP (Hann)": reconstruct.wbp(data, projector, filter="hann"),
        "SIRT x20": reconstruct.sirt(data, projector, 20, nonnegative=True),
        "TV-MAP x150": reconstruct.tv_map(data, projector, lam, 150, nonnegative=True),
    }
    volumes = {
        "ground truth": np.asarray(truth),
        **{k: np.asarray(r.volume) for k, r in results.items()},
    }
    plot.save_figure(
        plot.ortho_slices(volumes, title="±60°, 2° steps, SNR 1"), FIGURES / "reconstructions.png"
    )
    curves = {k: metrics.fsc(r.volume, truth, voxel_size=10.0) for k, r in results.items()}
    plot.save_figure(
        plot.fsc_curves(curves, title="FSC against the ground truth"), FIGURES / "fsc.png"
    )
    lines = [
        "| method | PSNR (dB) | SSIM | FSC 0.5 resolution (Å, 10 Å voxels) |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {float(metrics.psnr(r.volume, truth)):.2f} | "
            f"{float(metrics.ssim(r.volume, truth)):.3f} | {float(curves[name].resolution_05):.1f} |"
        )
    _write_text(FIGURES / "reconstruction_table.md", "\n".join(lines) + "\n")


def simulated_tomogram(seed: int = 0) -> None:
    """Figure 3: a crowded synthetic tomogram (SHREC classes, CTF, SNR 0.1) and its labels."""
    config = simulate.SimulationConfig(
        shape=(96, 192, 192), n_particles=150, occupancy=None, defocus=3.0, snr=0.1
    )
    sim = simulate.simulate_tomogram(jax.random.key(seed), config)
    volumes = {"tomogram (WBP)": sim.tomogram, "ground truth": sim.ground_truth, "labels": sim.labels}
    title = (
        f"{len(sim.particles)} particles of 12 classes, ±60°, CTF 3 µm, "
        f"SNR {sim.acquisition.measured_snr:.3f}"
    )
    plot.save_figure(
        plot.ortho_slices(volumes, title=title, categorical=("labels",)),
        FIGURES / "simulated_tomogram.png",
    )


def projector_table() -> None:
    results = HERE.parent / "benchmarks" / "results" / "projector.json"
    if not results.exists():
        print(f"no {results}: run `make bench` first; Table 2 not written")
        return
    readme = (HERE.parent / "benchmarks" / "README.md").read_text()
    start, end = "<!-- projector:start -->", "<!-- projector:end -->"
    table = readme.split(start, 1)[1].split(end, 1)[0].strip() if start in readme else ""
    headline = json.loads(results.read_text()).get("headline", "")
    _write_text(FIGURES / "projector_table.md", f"{headline}\n\n{table}\n")


if __name__ == "__main__":
    FIGURES.mkdir(parents=True, exist_ok=True)
    reconstructions()
    simulated_tomogram()
    projector_table()
    import mwr_experiments  # beside this file, so on sys.path when it runs as a script

    mwr_experiments.main()
    print(f"figures and tables written to {FIGURES}")
