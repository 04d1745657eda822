"""Shared helpers for the benchmarks: timing, machine description, atomic writes, Markdown tables.

Every benchmark times the project and its peers in one run on the same inputs: the first call
(compilation, caches) is excluded, the median of several calls is reported, and each pair of
times becomes a ratio project / peer (below 1 means the project is faster).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

# Calls slower than this (after warm-up) get fewer repeats, so slow peers do not dominate the run.
SLOW_CALL_S = 1.0
# The project's memory-bound timings swung by +-30% between calls on the shared 2-core host;
# more calls make the median less sensitive to such swings.
FAST_REPEATS = 15
SLOW_REPEATS = 3
# Interleaved timing: calls per burst fill about this many seconds, and are at most MAX_BURST.
BURST_S = 0.5
MAX_BURST = 50


def time_call(fn: Callable[[], Any], repeats: int | None = None, warmup: bool = True) -> dict:
    """Time `fn()`, after one excluded warm-up call unless `warmup` is False.

    Args:
        fn: a callable with no arguments that returns only once its work is finished (JAX callers
            must `jax.block_until_ready` inside it).
        repeats: how many timed calls; None picks `FAST_REPEATS`, or `SLOW_REPEATS` when the
            warm-up call took longer than `SLOW_CALL_S` seconds.
        warmup: make the excluded first call. Skip it only for code with nothing to compile or
            cache whose single call is too slow to repeat (then `repeats` is required).

    Returns:
        {"median_ms", "min_ms", "runs_ms", "warmup_ms"}: wall-clock times in milliseconds
        (`warmup_ms` is None without a warm-up call).
    """
    if repeats is not None and repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats}")
    if not warmup and repeats is None:
        raise ValueError("time_call without a warm-up call needs an explicit number of repeats")
    warmup_s = None
    if warmup:
        t0 = time.perf_counter()
        fn()
        warmup_s = time.perf_counter() - t0
    if repeats is None:
        repeats = SLOW_REPEATS if warmup_s > SLOW_CALL_S else FAST_REPEATS
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return {
        "median_ms": 1e3 * statistics.median(runs),
        "min_ms": 1e3 * min(runs),
        "runs_ms": [1e3 * r for r in runs],
        "warmup_ms": None if warmup_s is None else 1e3 * warmup_s,
    }


def time_interleaved(
    fns: dict[str, Callable[[], Any]], repeats: int | None = None, burst_s: float = BURST_S
) -> dict:
    """Time several callables in alternation: two excluded warm-up calls each (the second sizes
    the run), then rounds in which each runs a short burst of calls back to back, so a drift of the machine's speed during the run
    (seen here: +-30% between minutes) reaches every callable alike and leaves their ratios alone.

    Bursts, not single calls: the project's kernels use both cores, and its first call after a
    long single-threaded peer call ran up to 2x slower while the idle core woke up (128^3 forward:
    21 ms alone after ASTRA, 9-10 ms from the third call of a burst on). A solver calls the
    operator back to back, as a burst does. Every call is timed and kept; the median is over all.

    Args:
        fns: name -> callable with no arguments that returns once its work is finished.
        repeats: rounds; None picks `FAST_REPEATS`, or `SLOW_REPEATS` when any second warm-up
            call took longer than `SLOW_CALL_S` seconds.
        burst_s: a callable's burst has as many calls as fit in this many seconds by its second
            warm-up call (at least 1, at most `MAX_BURST`); 0 gives single calls.

    Returns:
        name -> the dict `time_call` returns for it, plus `burst` (calls per round) and
        `cores_busy` (the process's CPU time over wall time during its calls: about 1 for
        single-threaded code); `runs_ms` is in call order, so each burst's first call can be
        picked out.
    """
    if repeats is not None and repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats}")
    if burst_s < 0:
        raise ValueError(f"burst_s must be >= 0, got {burst_s}")
    warmup_s, call_s = {}, {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()
        warmup_s[name] = time.perf_counter() - t0
        # The warm-up call includes compilation; a second, also excluded, call sizes the run.
        t0 = time.perf_counter()
        fn()
        call_s[name] = time.perf_counter() - t0
    if repeats is None:
        repeats = SLOW_REPEATS if max(call_s.values()) > SLOW_CALL_S else FAST_REPEATS
    burst = {
        name: max(1, min(MAX_BURST, int(burst_s / max(c, 1e-9)))) for name, c in call_s.items()
    }
    runs = {name: [] for name in fns}
    cpu = dict.fromkeys(fns, 0.0)
    for _ in range(repeats):
        for name, fn in fns.items():
            for _ in range(burst[name]):
                c0, t0 = time.process_time(), time.perf_counter()
                fn()
                runs[name].append(time.perf_counter() - t0)
                cpu[name] += time.process_time() - c0
    return {
        name: {
            "median_ms": 1e3 * statistics.median(r),
            "min_ms": 1e3 * min(r),
            "runs_ms": [1e3 * x for x in r],
            "warmup_ms": 1e3 * warmup_s[name],
            "burst": burst[name],
            "cores_busy": cpu[name] / sum(r),
        }
        for name, r in runs.items()
    }


def ratio(project_ms: float, peer_ms: float) -> float:
    """Project time over peer time (below 1: the project is faster); NaN if either is missing."""
    if project_ms is None or peer_ms is None or not peer_ms > 0:
        return math.nan
    return project_ms / peer_ms


def package_version(name: str) -> str | None:
    """Installed distribution version of `name`, or None if it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(packages: tuple[str, ...] = ()) -> dict:
    """Where and when a benchmark ran: CPU model, cores usable, memory, OS, versions, UTC date."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count()
    info = {
        "cpu_model": cpu_model(),
        "cores": cores,
        "cores_total": os.cpu_count(),
        "memory_gb": _total_memory_gb(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {p: package_version(p) for p in packages},
    }
    return info


def _total_memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write `obj` as indented JSON via a temporary file and `os.replace` (never half-written).

    NaN and infinities become null, so the file is strict JSON.
    """
    _atomic_write_text(Path(path), json.dumps(_finite(obj), indent=2) + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub Markdown table; each cell is `str()`-ed, None becomes an en dash."""
    if any(len(r) != len(headers) for r in rows):
        raise ValueError("every row of a Markdown table needs one cell per header")

    def cell(v):
        return "–" if v is None else str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def replace_block(text: str, name: str, content: str) -> str:
    """Put `content` between `<!-- name:start -->` and `<!-- name:end -->` in `text`.

    The markers are kept; if they are absent the block is appended at the end of `text`.
    """
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{content.strip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        return pattern.sub(lambda _: block, text, count=1)
    sep = "" if text.endswith("\n\n") or not text else ("\n" if text.endswith("\n") else "\n\n")
    return f"{text}{sep}{block}\n"


def update_markdown_block(path: str | Path, name: str, content: str) -> None:
    """Rewrite the `name` block of the Markdown file at `path` atomically (creating the file)."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    _atomic_write_text(path, replace_block(text, name, content))


def peak_rss_self_bytes() -> int:
    """This process's peak resident memory since it started (VmHWM from /proc, Linux), in bytes."""
    with open("/proc/self/status") as f:
        return 1024 * next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


# Runs a script as __main__ and, at exit, writes the process's VmHWM (peak resident set since
# exec) to the file named by argv[1]. ru_maxrss from wait4/RUSAGE_CHILDREN is not used: Linux folds
# the pre-exec high-water mark (the forked parent's pages) into it, so a 3 GB parent would make
# every child look 3 GB big.
_PEAK_LAUNCHER = """
import atexit, runpy, sys
def _write_peak(path=sys.argv[1]):
    with open('/proc/self/status') as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
    with open(path, 'w') as f:
        f.write(str(kib * 1024))
atexit.register(_write_peak)
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def run_script_with_peak_rss(script: str | Path, args: list[str] = ()) -> tuple[str, int]:
    """Run `python script args...` in a child process; return its stdout and peak resident memory.

    The peak is the child's own VmHWM from /proc (Linux), the high-water mark of its resident set
    since it started the interpreter, so the parent's memory never counts.

    Returns:
        (stdout, peak_rss_bytes).
    """
    if not Path("/proc/self/status").exists():
        raise RuntimeError("peak memory of a child process is read from /proc: Linux only")
    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        proc = subprocess.run(
            [sys.executable, "-c", _PEAK_LAUNCHER, str(peak_file), str(script), *map(str, args)],
            stdout=subprocess.PIPE, text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark child {script} failed with exit code {proc.returncode}")
        return proc.stdout, int(peak_file.read_text())


def fmt_ms(ms: float | None) -> str | None:
    """Milliseconds with three significant figures, or None."""
    if ms is None or not math.isfinite(ms):
        return None
    # 999.9 would print as "1e+03" in three significant figures.
    return f"{ms:.3g}" if ms < 999.5 else f"{ms:,.0f}"


def fmt_ratio(r: float | None) -> str | None:
    """A ratio project / peer as e.g. '0.12 (8.3x faster)'."""
    if r is None or not math.isfinite(r) or r <= 0:
        return None
    speed = f"{1 / r:.3g}x faster" if r < 1 else f"{r:.3g}x slower"
    return f"{r:.3g} ({speed})"
