"""Simulator benchmark: time and peak memory of one SHREC-sized crowded tomogram.

A 200 x 512 x 512 tomogram at 10 Å/voxel with the twelve SHREC'21 classes and 1500 particles,
3 vesicles, 5 gold beads and 50 decoys; 61 tilts from -60 to 60 deg, dose-symmetric, radiation
damage, CTF at 3 µm underfocus, Gaussian noise at SNR 0.1, Hann-filtered WBP; then every file of
the dataset written. It runs in a child process so its peak resident memory is its own. There is
no peer: PolNet and the SHREC generator are not installable from the package registry.

    python benchmarks/bench_simulate.py            # the SHREC-sized case (about a minute)
    python benchmarks/bench_simulate.py --quick    # 64 x 128 x 128, results/simulate_quick.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import (
    machine_info,
    markdown_table,
    run_script_with_peak_rss,
    update_markdown_block,
    write_json_atomic,
)

CASES = {
    "shrec": {"shape": (200, 512, 512), "n_particles": 1500, "n_vesicles": 3, "n_gold": 5,
              "n_decoys": 50},
    "quick": {"shape": (64, 128, 128), "n_particles": 60, "n_vesicles": 1, "n_gold": 2,
              "n_decoys": 10},
}  # fmt: skip


def child(case: str) -> None:
    """Simulate and write one tomogram, printing stage times as JSON on stdout."""
    import jax

    from cryojax_mw import simulate
    from cryojax_mw.simulate import _dataset

    config = simulate.SimulationConfig(**CASES[case], occupancy=None, defocus=3.0)
    times = {}
    start = time.perf_counter()
    config.load_templates()
    times["load_templates_s"] = time.perf_counter() - start
    t = time.perf_counter()
    sim = simulate.simulate_tomogram(jax.random.key(0), config)
    times["simulate_s"] = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as folder:
        t = time.perf_counter()
        _dataset._write_tomogram(Path(folder), sim, "tomo_000")
        times["write_s"] = time.perf_counter() - t
        size = sum(p.stat().st_size for p in Path(folder).iterdir())
    times["total_s"] = time.perf_counter() - start
    summary = sim.summary()
    print(json.dumps({
        **times,
        "n_particles": summary["n_particles"],
        "occupancy": summary["occupancy"],
        "measured_snr": summary["measured_snr"],
        "n_tilts": config.geometry().n_tilts,
        "dataset_bytes": size,
    }))  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small case, seconds")
    p.add_argument("--child", choices=sorted(CASES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child)
        return 0
    case = "quick" if args.quick else "shrec"
    stdout, peak = run_script_with_peak_rss(Path(__file__), ["--child", case])
    result = json.loads(stdout.strip().splitlines()[-1])
    result["peak_rss_gb"] = peak / 1e9
    config = CASES[case]
    report = {"machine": machine_info(("jax", "numpy")), "case": case, "config": config,
              "result": result}  # fmt: skip
    name = "simulate_quick.json" if args.quick else "simulate.json"
    write_json_atomic(HERE / "results" / name, report)
    shape = "x".join(map(str, config["shape"]))
    rows = [[shape, result["n_particles"], result["n_tilts"], f"{result['simulate_s']:.1f}",
             f"{result['write_s']:.1f}", f"{result['total_s']:.1f}", f"{result['peak_rss_gb']:.2f}",
             f"{result['measured_snr']:.3f}"]]  # fmt: skip
    table = markdown_table(
        ["volume", "particles", "tilts", "simulate (s)", "write files (s)", "total (s)",
         "peak memory (GB)", "measured SNR (asked 0.1)"],
        rows,
    )  # fmt: skip
    machine = report["machine"]
    text = f"{table}\n\nMachine: {machine['cpu_model']}, {machine['cores']} cores, {machine['date_utc']}.\n"
    print(text)
    if not args.quick:
        update_markdown_block(HERE / "README.md", "simulate", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
