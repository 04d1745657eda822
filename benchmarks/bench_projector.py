"""Tilt projector benchmark: cryojax_mw against ASTRA (CPU) and scikit-image, in one run.

Every case projects the same float32 volume (uniform random values in [0, 1) inside the disc, or
the cylinder around the tilt axis, inscribed in the (z, x) plane, so no peer loses mass off its
detector; seed 0) with 61 tilts from -60 to 60 degrees in steps of 2, and times:

- forward projection and adjoint (backprojection): `cryojax_mw.TiltProjector` (jitted), ASTRA's
  CPU 2D parallel-beam `linear` projector (one call in 2D, a loop over y slices in 3D: ASTRA has
  no CPU 3D projector), scikit-image `radon` / unfiltered `iradon` (2D only: it needs a square
  image and has no 3D form);
- filtered backprojection (ramp filter) and 50 SIRT iterations: `cryojax_mw.reconstruct.wbp` and
  `cryojax_mw.reconstruct.sirt` against ASTRA's CPU `FBP` and `SIRT` (slice loop in 3D) and
  scikit-image `iradon` with the ramp filter (FBP, 2D);
- 512^3 forward projection for the project alone, in a child process whose peak resident memory
  (its own VmHWM) is reported, so the parent's memory does not count.

Warm-up calls (JIT compilation) are excluded; medians are reported, with the ratio project / peer
beside the absolute times. Forward and adjoint calls of the project and ASTRA alternate in 15
rounds (3 for calls over 1 s), each a burst of back-to-back calls filling about 0.5 s
(`time_interleaved`), so a drift of the machine's speed reaches both alike; reconstructions are
timed as 15 calls (3 over 1 s). The CPU time over wall time of the alternating calls is reported
as the cores each tool kept busy. Forward projections of the project and ASTRA are compared
(relative L2 difference after a least-squares scale fit).

Usage:
    python benchmarks/bench_projector.py            # all cases: results/projector.json + README table
    python benchmarks/bench_projector.py --quick    # small sizes, seconds; results/projector_quick.json
    python benchmarks/bench_projector.py --cases 2d-256 3d-128   # results/projector_partial.json

Only a complete full-size run rewrites results/projector.json and the table in README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _common import (  # noqa: E402
    fmt_ms,
    fmt_ratio,
    machine_info,
    markdown_table,
    peak_rss_self_bytes,
    ratio,
    run_script_with_peak_rss,
    time_call,
    time_interleaved,
    update_markdown_block,
    write_json_atomic,
)

TILTS_DEG = np.arange(-60.0, 60.0 + 1e-9, 2.0)
SIRT_ITERS = 50
SEED = 0

# Case name -> (kind, edge length at full size, edge length with --quick).
CASES = {
    "2d-256": ("2d", 256, 64),
    "3d-128": ("3d", 128, 24),
    "3d-256": ("3d", 256, 32),
    "3d-512": ("huge", 512, 64),
    "recon-2d-256": ("recon2d", 256, 64),
    "recon-3d-128": ("recon3d", 128, 16),
}

# Targets the project states; reported pass/fail beside the measurement, never tuned towards.
AGREEMENT_TARGET = 1e-3
FWD_2D_SPEEDUP_TARGET = 8.0
FWD_ADJ_3D128_SPEEDUP_TARGET = 50.0
HUGE_TIME_TARGET_S = 2.5
HUGE_MEMORY_TARGET_GB = 6.0

PROJECT = "cryojax_mw"
ASTRA = "ASTRA CPU linear"
SKIMAGE = "scikit-image"


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def disc_mask(nz: int, nx: int) -> np.ndarray:
    """True inside the disc inscribed in the centred (z, x) grid."""
    z = np.arange(nz) - (nz - 1) / 2
    x = np.arange(nx) - (nx - 1) / 2
    # One pixel inside n / 2, so scikit-image's own circle (centre n // 2) contains it too.
    r = min(nz, nx) / 2 - 1
    return z[:, None] ** 2 + x[None, :] ** 2 <= r**2


def make_volume(shape: tuple[int, ...]) -> np.ndarray:
    """Uniform random float32 values in [0, 1) inside the inscribed disc/cylinder, zero outside."""
    rng = np.random.default_rng(SEED)
    vol = rng.random(shape, dtype=np.float32)
    mask = disc_mask(shape[0], shape[-1])
    return vol * (mask if len(shape) == 2 else mask[:, None, :])


def relative_difference(ours: np.ndarray, peer: np.ndarray) -> tuple[float, float]:
    """Relative L2 difference ||ours - a peer|| / ||ours|| after the least-squares scale a.

    Returns:
        (relative difference, a).
    """
    ours = np.asarray(ours, np.float64).ravel()
    peer = np.asarray(peer, np.float64).ravel()
    a = float(ours @ peer / (peer @ peer))
    return float(np.linalg.norm(ours - a * peer) / np.linalg.norm(ours)), a


# ---------------------------------------------------------------------------------------------
# The project
# ---------------------------------------------------------------------------------------------


class Project:
    """The project's jitted forward projection, adjoint, WBP and SIRT for one volume shape."""

    def __init__(self, shape: tuple[int, ...]):
        import jax

        from cryojax_mw import TiltGeometry, TiltProjector

        self.jax = jax
        self.op = TiltProjector(TiltGeometry(TILTS_DEG), shape)
        self._fwd = jax.jit(lambda v: self.op.mv(v))
        self._adj = jax.jit(lambda s: self.op.T.mv(s))

    def forward(self, vol):
        return self.jax.block_until_ready(self._fwd(vol))

    def adjoint(self, sino):
        return self.jax.block_until_ready(self._adj(sino))

    def wbp_fn(self):
        # Imported here: the reconstruction module is optional for the projector timings.
        from cryojax_mw.reconstruct import wbp

        f = self.jax.jit(lambda s: wbp(s, self.op, filter="ramp").volume)
        return lambda s: self.jax.block_until_ready(f(s))

    def sirt_fn(self, num_iters: int):
        from cryojax_mw.reconstruct import sirt

        f = self.jax.jit(lambda s: sirt(s, self.op, num_iters).volume)
        return lambda s: self.jax.block_until_ready(f(s))


# ---------------------------------------------------------------------------------------------
# ASTRA
# ---------------------------------------------------------------------------------------------
#
# Geometry mapping, found by reasoning and checked with a single bright voxel off-centre (and a
# random image: forward projections agree to ~2e-5):
#   - our 2D image (z, x) is ASTRA's volume with rows = z and columns = x
#     (astra.create_vol_geom(n_z, n_x));
#   - ASTRA's row axis points the other way from its y coordinate (row 0 is at the top, +y), and
#     its parallel-beam detector coordinate is t = x cos(phi) + y sin(phi); with y = -z this is our
#     t = x cos(theta) + z sin(theta) for phi = -theta, so ASTRA's angles are -radians(theta);
#   - detector width n_x, pixel size 1, centred, no flip: ASTRA's detector index grows with t as ours.
# ASTRA's CPU `linear` projector interpolates linearly within the slice the ray crosses (Joseph),
# as ours does, so the two agree to float32 rounding.


class Astra:
    """ASTRA's CPU 2D parallel-beam `linear` projector and algorithms, applied per y slice in 3D.

    Data objects are linked to preallocated numpy buffers and algorithm objects are created once,
    so the timed loop pays only ASTRA's computation and one slice copy in and out.
    """

    def __init__(self, nz: int, nx: int):
        import astra

        self.astra = astra
        self.nz, self.nx, self.nt = nz, nx, len(TILTS_DEG)
        vg = astra.create_vol_geom(nz, nx)
        pg = astra.create_proj_geom("parallel", 1.0, nx, -np.deg2rad(TILTS_DEG))
        self.pid = astra.create_projector("linear", pg, vg)
        self.vol = np.zeros((nz, nx), np.float32)
        self.sino = np.zeros((self.nt, nx), np.float32)
        self.vid = astra.data2d.link("-vol", vg, self.vol)
        self.sid = astra.data2d.link("-sino", pg, self.sino)
        self.fp = self._alg("FP", VolumeDataId=self.vid)
        self.bp = self._alg("BP", ReconstructionDataId=self.vid)
        self.fbp = self._alg("FBP", ReconstructionDataId=self.vid, FilterType="ram-lak")
        self.sirt = self._alg("SIRT", ReconstructionDataId=self.vid)

    def _alg(self, name, **cfg):
        d = self.astra.astra_dict(name)
        d.update(ProjectorId=self.pid, ProjectionDataId=self.sid, **cfg)
        return self.astra.algorithm.create(d)

    def close(self):
        for a in (self.fp, self.bp, self.fbp, self.sirt):
            self.astra.algorithm.delete(a)
        self.astra.data2d.delete([self.vid, self.sid])
        self.astra.projector.delete(self.pid)

    def _slices(self, x, n_out_rows, src, dst, run):
        """Apply `run` to each y slice of x (2D arrays are one slice): copy into src, read dst."""
        if x.ndim == 2:
            np.copyto(src, x)
            run()
            return dst.copy()
        out = np.empty((n_out_rows, x.shape[1], dst.shape[1]), np.float32)
        for j in range(x.shape[1]):
            np.copyto(src, x[:, j, :])
            run()
            out[:, j, :] = dst
        return out

    def forward(self, vol):
        return self._slices(vol, self.nt, self.vol, self.sino, lambda: self.astra.algorithm.run(self.fp))

    def adjoint(self, sino):
        return self._slices(sino, self.nz, self.sino, self.vol, lambda: self.astra.algorithm.run(self.bp))

    def fbp_ramp(self, sino):
        return self._slices(sino, self.nz, self.sino, self.vol, lambda: self.astra.algorithm.run(self.fbp))

    def sirt_iters(self, sino, num_iters):
        def run():
            # ASTRA's SIRT starts from whatever the reconstruction buffer holds: start from zero.
            self.vol.fill(0.0)
            self.astra.algorithm.run(self.sirt, num_iters)

        return self._slices(sino, self.nz, self.sino, self.vol, run)


# ---------------------------------------------------------------------------------------------
# scikit-image (2D, square images only; its detector has n pixels with circle=True)
# ---------------------------------------------------------------------------------------------


class Skimage:
    def __init__(self):
        from skimage.transform import iradon, radon

        self.radon, self.iradon = radon, iradon

    def forward(self, img):
        return self.radon(img, theta=TILTS_DEG, circle=True)

    def adjoint(self, sino_t):
        return self.iradon(sino_t, theta=TILTS_DEG, filter_name=None, circle=True)

    def fbp_ramp(self, sino_t):
        return self.iradon(sino_t, theta=TILTS_DEG, filter_name="ramp", circle=True)


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------


def _entry(case, operation, project_t, peer_name=None, peer_t=None, note=None):
    row = {
        "case": case,
        "operation": operation,
        "project_ms": project_t["median_ms"] if project_t else None,
        "project_timing": project_t,
        "peer": peer_name,
        "peer_ms": peer_t["median_ms"] if peer_t else None,
        "peer_timing": peer_t,
    }
    row["ratio_project_over_peer"] = ratio(row["project_ms"], row["peer_ms"])
    if note:
        row["note"] = note
    return row


def run_projection_case(case: str, shape: tuple[int, ...], log) -> dict:
    """Forward and adjoint timings (project, ASTRA, scikit-image in 2D) and forward agreement."""
    import jax.numpy as jnp

    vol = make_volume(shape)
    proj = Project(shape)
    vol_j = jnp.asarray(vol)
    sino_j = proj.forward(vol_j)
    sino = np.asarray(sino_j)
    nz, nx = shape[0], shape[-1]
    astra = Astra(nz, nx)
    rows = []
    try:
        log(f"[{case}] forward")
        t = time_interleaved({"p": lambda: proj.forward(vol_j), "a": lambda: astra.forward(vol)})
        t_pf, t_af = t["p"], t["a"]
        rows.append(_entry(case, "forward", t_pf, ASTRA, t_af,
                           None if len(shape) == 2 else "ASTRA: loop over y slices"))
        log(f"[{case}] adjoint")
        t = time_interleaved({"p": lambda: proj.adjoint(sino_j), "a": lambda: astra.adjoint(sino)})
        t_pa, t_aa = t["p"], t["a"]
        rows.append(_entry(case, "adjoint", t_pa, ASTRA, t_aa,
                           None if len(shape) == 2 else "ASTRA: loop over y slices"))
        sum_p = {"median_ms": t_pf["median_ms"] + t_pa["median_ms"]}
        sum_a = {"median_ms": t_af["median_ms"] + t_aa["median_ms"]}
        rows.append(_entry(case, "forward+adjoint", sum_p, ASTRA, sum_a, "sum of the two medians"))
        agree_fwd, scale_fwd = relative_difference(sino, astra.forward(vol))
        agree_adj, scale_adj = relative_difference(np.asarray(proj.adjoint(sino_j)), astra.adjoint(sino))
    finally:
        astra.close()
    if len(shape) == 2:
        sk = Skimage()
        sino_t = np.ascontiguousarray(sino.T)
        log(f"[{case}] scikit-image")
        rows.append(_entry(case, "forward", t_pf, SKIMAGE, time_call(lambda: sk.forward(vol)),
                           "radon(circle=True); needs a square image"))
        rows.append(_entry(case, "adjoint", t_pa, SKIMAGE, time_call(lambda: sk.adjoint(sino_t)),
                           "iradon(filter_name=None, circle=True)"))
    return {
        "case": case,
        "shape": list(shape),
        "n_tilts": len(TILTS_DEG),
        "rows": rows,
        "agreement": {
            "forward_vs_astra_linear": {"rel_l2_after_scale_fit": agree_fwd, "scale": scale_fwd},
            "adjoint_vs_astra_linear": {"rel_l2_after_scale_fit": agree_adj, "scale": scale_adj},
        },
    }


def run_recon_case(case: str, shape: tuple[int, ...], log) -> dict:
    """Ramp-filtered backprojection and 50 SIRT iterations: project vs ASTRA (and scikit-image FBP)."""
    import jax.numpy as jnp

    vol = make_volume(shape)
    proj = Project(shape)
    sino_j = proj.forward(jnp.asarray(vol))
    sino = np.asarray(sino_j)
    nz, nx = shape[0], shape[-1]
    astra = Astra(nz, nx)
    rows, agreement, missing = [], {}, None
    note3d = None if len(shape) == 2 else "ASTRA: loop over y slices"
    try:
        try:
            wbp = proj.wbp_fn()
            sirt = proj.sirt_fn(SIRT_ITERS)
        except ImportError as e:
            missing = f"cryojax_mw.reconstruct not importable: {e}"
            wbp = sirt = None
        log(f"[{case}] FBP")
        t_pw = time_call(lambda: wbp(sino_j)) if wbp else None
        t_aw = time_call(lambda: astra.fbp_ramp(sino))
        rows.append(_entry(case, "FBP (ramp)", t_pw, ASTRA.replace("linear", "FBP"), t_aw, note3d))
        log(f"[{case}] SIRT x{SIRT_ITERS}")
        t_ps = time_call(lambda: sirt(sino_j)) if sirt else None
        astra_sirt = {}  # the last timed result, reused for the agreement: no extra slow call

        def run_astra_sirt():
            astra_sirt["volume"] = astra.sirt_iters(sino, SIRT_ITERS)

        if len(shape) == 2:
            t_as = time_call(run_astra_sirt)
            note = None
        else:
            # About a minute per call at 128^3 and nothing to compile: one call, no warm-up.
            t_as = time_call(run_astra_sirt, repeats=1, warmup=False)
            note = "ASTRA: loop over y slices, a single call"
        rows.append(_entry(case, f"SIRT x{SIRT_ITERS}", t_ps, ASTRA.replace("linear", "SIRT"), t_as, note))
        if wbp:
            agreement["fbp_vs_astra_fbp"] = dict(zip(
                ("rel_l2_after_scale_fit", "scale"),
                relative_difference(np.asarray(wbp(sino_j)), astra.fbp_ramp(sino))))
            agreement["sirt_vs_astra_sirt"] = dict(zip(
                ("rel_l2_after_scale_fit", "scale"),
                relative_difference(np.asarray(sirt(sino_j)), astra_sirt["volume"])))
    finally:
        astra.close()
    if len(shape) == 2:
        sk = Skimage()
        sino_t = np.ascontiguousarray(sino.T)
        rows.append(_entry(case, "FBP (ramp)", t_pw, SKIMAGE, time_call(lambda: sk.fbp_ramp(sino_t)),
                           "iradon(filter_name='ramp', circle=True)"))
    out = {"case": case, "shape": list(shape), "n_tilts": len(TILTS_DEG), "rows": rows,
           "agreement": agreement}
    if missing:
        out["missing"] = missing
    return out


def huge_child(n: int) -> None:
    """Child-process body of the 512^3 case: time the forward projection, print JSON."""
    import jax
    import jax.numpy as jnp

    # Built one z slice at a time inside JAX, so generating the input adds no full-size temporaries
    # (random bits, unmasked copy) to the peak memory that the projector is judged by.
    mask = jnp.asarray(disc_mask(n, n), jnp.float32)  # (z, x), the same for every y
    keys = jax.random.split(jax.random.key(SEED), n)
    make = jax.jit(lambda ks, m: jax.lax.map(lambda a: jax.random.uniform(a[0], (n, n)) * a[1], (ks, m)))
    vol = jax.block_until_ready(make(keys, mask))
    rss_before = peak_rss_self_bytes()
    proj = Project((n, n, n))
    timing = time_call(lambda: proj.forward(vol), repeats=3)
    print(json.dumps({"timing": timing, "peak_rss_before_projection_bytes": rss_before}))


def run_huge_case(case: str, n: int, log) -> dict:
    """512^3 forward projection timed in a child process, with the child's peak memory."""
    log(f"[{case}] forward in a child process")
    out, peak = run_script_with_peak_rss(Path(__file__).resolve(), ["--huge-child", str(n)])
    res = json.loads(out.strip().splitlines()[-1])
    row = _entry(case, "forward", res["timing"], note="project only; child process")
    return {
        "case": case,
        "shape": [n, n, n],
        "n_tilts": len(TILTS_DEG),
        "rows": [row],
        "memory": {
            "peak_rss_bytes": peak,
            "peak_rss_gb": peak / 1e9,
            "peak_rss_before_projection_bytes": res["peak_rss_before_projection_bytes"],
            "volume_bytes": 4 * n**3,
            "tilt_series_bytes": 4 * len(TILTS_DEG) * n * n,
        },
    }


# ---------------------------------------------------------------------------------------------
# Targets, table, headline
# ---------------------------------------------------------------------------------------------


def _find(cases, case, operation, peer=PROJECT):
    for c in cases:
        if c["case"] != case:
            continue
        for r in c["rows"]:
            if r["operation"] == operation and (peer == PROJECT or r["peer"] == peer):
                return c, r
    return None, None


def evaluate_targets(cases: list[dict], quick: bool) -> list[dict]:
    """Pass/fail of each stated target; `pass` is None where the case did not run at full size."""
    targets = []

    def add(name, value, threshold, passed, unit=""):
        # Quick sizes are not the sizes the targets speak of: no verdict for them.
        ok = None if (quick or value is None) else bool(passed)
        status = "quick sizes" if quick else ("not run" if ok is None else ("pass" if ok else "FAIL"))
        targets.append({"target": name, "value": value, "threshold": threshold, "unit": unit,
                        "pass": ok, "status": status})

    agreements = [c["agreement"]["forward_vs_astra_linear"]["rel_l2_after_scale_fit"]
                  for c in cases if "forward_vs_astra_linear" in c.get("agreement", {})]
    worst = max(agreements) if agreements else None
    add("forward agreement with ASTRA linear (worst case, rel. L2)", worst, AGREEMENT_TARGET,
        worst is not None and worst <= AGREEMENT_TARGET)

    _, r = _find(cases, "2d-256", "forward", ASTRA)
    speed = 1 / r["ratio_project_over_peer"] if r and r["ratio_project_over_peer"] > 0 else None
    add("2D 256^2 forward speed-up over ASTRA CPU linear", speed, FWD_2D_SPEEDUP_TARGET,
        speed is not None and speed >= FWD_2D_SPEEDUP_TARGET, "x")

    _, r = _find(cases, "3d-128", "forward+adjoint", ASTRA)
    speed = 1 / r["ratio_project_over_peer"] if r and r["ratio_project_over_peer"] > 0 else None
    add("3D 128^3 forward+adjoint speed-up over the ASTRA slice loop", speed,
        FWD_ADJ_3D128_SPEEDUP_TARGET, speed is not None and speed >= FWD_ADJ_3D128_SPEEDUP_TARGET, "x")

    c, r = _find(cases, "3d-512", "forward")
    secs = r["project_ms"] / 1e3 if r else None
    add("512^3 forward time", secs, HUGE_TIME_TARGET_S, secs is not None and secs < HUGE_TIME_TARGET_S, "s")
    gb = c["memory"]["peak_rss_gb"] if c else None
    add("512^3 forward peak memory (child RSS)", gb, HUGE_MEMORY_TARGET_GB,
        gb is not None and gb < HUGE_MEMORY_TARGET_GB, "GB")
    return targets


def headline(cases: list[dict], machine: dict) -> str:
    parts = []
    _, r = _find(cases, "2d-256", "forward", ASTRA)
    if r:
        parts.append(f"2D 256^2 forward {1 / r['ratio_project_over_peer']:.3g}x faster than ASTRA CPU")
    _, r = _find(cases, "3d-128", "forward+adjoint", ASTRA)
    if r:
        parts.append(f"3D 128^3 forward+adjoint {1 / r['ratio_project_over_peer']:.3g}x faster than "
                     "ASTRA's CPU slice loop")
    c, r = _find(cases, "3d-512", "forward")
    if r:
        parts.append(f"512^3 forward {r['project_ms'] / 1e3:.2f} s at {c['memory']['peak_rss_gb']:.2f} GB peak")
    agreements = [c["agreement"]["forward_vs_astra_linear"]["rel_l2_after_scale_fit"]
                  for c in cases if "forward_vs_astra_linear" in c.get("agreement", {})]
    if agreements:
        parts.append(f"forward projections match ASTRA to {max(agreements):.1e}")
    where = f"{machine['cores']} cores {machine['cpu_model']}, float32, 61 tilts"
    return f"Projector ({where}): " + "; ".join(parts) + "." if parts else ""


def _cores_busy(row: dict) -> str:
    """'project / peer' cores busy for interleaved timings, '–' where it was not measured."""
    busy = [(row.get(k) or {}).get("cores_busy") for k in ("project_timing", "peer_timing")]
    if None in busy:
        return "–"
    return f"{busy[0]:.1f} / {busy[1]:.1f}"


def markdown(result: dict) -> str:
    m = result["machine"]
    v = m["versions"]
    lines = [
        f"Machine: {m['cpu_model']}, {m['cores']} cores usable, {m['memory_gb']} GB; "
        f"jax {v.get('jax')}, astra-toolbox {v.get('astra-toolbox')}, scikit-image "
        f"{v.get('scikit-image')}; {m['date_utc']}. float32, {len(TILTS_DEG)} tilts "
        f"(-60..60 step 2). Forward and adjoint: median over all calls of 15 alternating rounds "
        f"(3 for calls above 1 s), each a burst of about 0.5 s per tool; reconstructions: median "
        f"of 15 calls (3 above 1 s); warm-up calls excluded; ratio = project / peer "
        f"(below 1: the project is faster). The project's forward and adjoint use both cores "
        f"(XLA:CPU splits each fused loop body over its threads), ASTRA's CPU projectors and "
        f"scikit-image one: 'cores busy' is CPU time over wall time during the timed calls.",
        "",
    ]
    if result["headline"]:
        lines += [f"**{result['headline']}**", ""]
    rows = []
    for c in result["cases"]:
        shape = "x".join(str(s) for s in c["shape"])
        for r in c["rows"]:
            rows.append([c["case"], shape, r["operation"], fmt_ms(r["project_ms"]), r["peer"],
                         fmt_ms(r["peer_ms"]), fmt_ratio(r["ratio_project_over_peer"]),
                         _cores_busy(r), r.get("note")])
    lines.append(markdown_table(
        ["case", "shape", "operation", "cryojax_mw (ms)", "peer", "peer (ms)", "ratio",
         "cores busy (project / peer)", "note"], rows))
    lines.append("")
    agr = []
    for c in result["cases"]:
        for name, a in c.get("agreement", {}).items():
            agr.append([c["case"], name, f"{a['rel_l2_after_scale_fit']:.2e}", f"{a['scale']:.6g}"])
    if agr:
        lines += ["Agreement (relative L2 difference after a least-squares scale fit; the forward "
                  "projection has a target, the rest are for information):", "",
                  markdown_table(["case", "pair", "rel. L2", "scale"], agr), ""]
    for c in result["cases"]:
        if "memory" in c:
            mem = c["memory"]
            lines += [f"{c['case']}: peak resident memory of the child process "
                      f"{mem['peak_rss_gb']:.2f} GB (volume {mem['volume_bytes'] / 1e9:.2f} GB, "
                      f"{mem['peak_rss_before_projection_bytes'] / 1e9:.2f} GB before projecting).", ""]
        if "missing" in c:
            lines += [f"{c['case']}: {c['missing']}", ""]
    tg = []
    for t in result["targets"]:
        val = None if t["value"] is None else f"{t['value']:.3g} {t['unit']}".strip()
        tg.append([t["target"], val, f"{t['threshold']:g} {t['unit']}".strip(), t["status"]])
    lines += ["Targets the project states:", "", markdown_table(["target", "measured", "target", "status"], tg)]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes only (seconds): checks the script runs")
    p.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES),
                   help="cases to run (default: all)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path (default results/projector.json for a complete full-size run, which "
                        "also rewrites the README table; projector_quick.json / projector_partial.json "
                        "otherwise)")
    p.add_argument("--huge-child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.huge_child is not None:
        huge_child(args.huge_child)
        return 0

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    cases = []
    for name in args.cases:
        kind, n_full, n_quick = CASES[name]
        n = n_quick if args.quick else n_full
        if kind == "huge":
            cases.append(run_huge_case(name, n, log))
        elif kind in ("2d", "recon2d"):
            run = run_projection_case if kind == "2d" else run_recon_case
            cases.append(run(name, (n, n), log))
        else:
            run = run_projection_case if kind == "3d" else run_recon_case
            cases.append(run(name, (n, n, n), log))

    machine = machine_info(("jax", "jaxlib", "astra-toolbox", "scikit-image", "numpy"))
    result = {
        "benchmark": "projector",
        "quick": args.quick,
        "machine": machine,
        "settings": {
            "dtype": "float32",
            "tilts_deg": "-60..60 step 2 (61 tilts)",
            "volume": f"uniform [0,1) inside the inscribed disc/cylinder, seed {SEED}",
            "sirt_iterations": SIRT_ITERS,
            "timing": "median after one excluded warm-up call; 15 calls, 3 if a call takes over 1 s",
        },
        "cases": cases,
    }
    result["targets"] = evaluate_targets(cases, args.quick)
    result["headline"] = "" if args.quick else headline(cases, machine)
    # Only a complete full-size run may replace the published results and table.
    complete = not args.quick and set(args.cases) == set(CASES)
    default = "projector.json" if complete else ("projector_quick.json" if args.quick else "projector_partial.json")
    out = args.out or HERE / "results" / default
    write_json_atomic(out, result)
    log(f"wrote {out}")
    table = markdown(result)
    if complete and args.out is None:
        update_markdown_block(HERE / "README.md", "projector", table)
        update_markdown_block(HERE.parent / "README.md", "headline", result["headline"])
        log(f"updated {HERE / 'README.md'} and the headline in {HERE.parent / 'README.md'}")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
