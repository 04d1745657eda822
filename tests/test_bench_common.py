"""The shared benchmark helpers: timing excludes the warm-up, Markdown blocks are replaced in place,
JSON writes are atomic and strict, and a child's peak memory excludes the parent's."""

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "_common.py"
_spec = importlib.util.spec_from_file_location("bench_common", _PATH)
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def test_time_call_excludes_warmup_and_makes_the_asked_number_of_calls():
    calls = []
    t = common.time_call(lambda: calls.append(1), repeats=5)
    assert len(calls) == 6
    assert len(t["runs_ms"]) == 5
    assert t["min_ms"] <= t["median_ms"] <= max(t["runs_ms"])


def test_time_call_uses_fast_repeats_for_fast_calls():
    t = common.time_call(lambda: None)
    assert len(t["runs_ms"]) == common.FAST_REPEATS


def test_time_call_without_warmup_makes_exactly_the_timed_calls():
    calls = []
    t = common.time_call(lambda: calls.append(1), repeats=2, warmup=False)
    assert len(calls) == 2 and t["warmup_ms"] is None


def test_time_call_rejects_zero_repeats_and_unbounded_calls_without_warmup():
    with pytest.raises(ValueError, match="repeats"):
        common.time_call(lambda: None, repeats=0)
    with pytest.raises(ValueError, match="explicit number of repeats"):
        common.time_call(lambda: None, warmup=False)


def test_time_interleaved_alternates_the_calls_after_two_warmups_each():
    order = []
    t = common.time_interleaved({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                                repeats=3, burst_s=0)
    assert order == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert set(t) == {"a", "b"}
    assert all(len(v["runs_ms"]) == 3 and v["warmup_ms"] is not None for v in t.values())


def test_time_interleaved_bursts_fill_their_time_and_stay_bounded():
    order = []

    def slow():
        order.append("s")
        time.sleep(0.03)

    t = common.time_interleaved({"s": slow, "f": lambda: order.append("f")}, repeats=2,
                                burst_s=0.07)
    # Two warm-up calls each, then per round: two 30 ms calls fill 0.07 s; the fast one gets
    # MAX_BURST.
    assert order == ["s", "s", "f", "f"] + (["s"] * 2 + ["f"] * common.MAX_BURST) * 2
    assert (t["s"]["burst"], t["f"]["burst"]) == (2, common.MAX_BURST)
    assert len(t["f"]["runs_ms"]) == 2 * common.MAX_BURST
    with pytest.raises(ValueError, match="burst_s"):
        common.time_interleaved({"f": lambda: None}, burst_s=-1)


def test_time_interleaved_times_each_callable_separately():
    t = common.time_interleaved({"slow": lambda: time.sleep(0.02), "fast": lambda: None},
                                repeats=2)
    assert t["slow"]["min_ms"] >= 20.0 > t["fast"]["median_ms"] * 10
    # Sleeping uses no CPU; a busy loop keeps one core busy.
    assert t["slow"]["cores_busy"] < 0.5


def test_time_interleaved_reports_cpu_time_over_wall_time_as_cores_busy(monkeypatch):
    # A fake machine on which every call takes 1 s of wall time and 2 s of CPU time (two cores).
    clock = {"wall": 0.0, "cpu": 0.0}

    def work():
        clock["wall"] += 1.0
        clock["cpu"] += 2.0

    monkeypatch.setattr(common.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(common.time, "process_time", lambda: clock["cpu"])
    t = common.time_interleaved({"w": work}, repeats=3, burst_s=0)
    assert t["w"]["cores_busy"] == 2.0
    assert t["w"]["runs_ms"] == [1000.0] * 3


def test_ratio_is_project_over_peer_and_nan_when_a_side_is_missing():
    assert common.ratio(2.0, 8.0) == 0.25
    assert math.isnan(common.ratio(None, 8.0))
    assert math.isnan(common.ratio(2.0, None))


def test_replace_block_rewrites_only_between_markers_and_is_idempotent():
    text = "# T\n\nbefore\n<!-- p:start -->\nold\n<!-- p:end -->\nafter\n"
    once = common.replace_block(text, "p", "new table")
    assert once == "# T\n\nbefore\n<!-- p:start -->\nnew table\n<!-- p:end -->\nafter\n"
    assert common.replace_block(once, "p", "new table") == once
    # Another benchmark's block is left alone.
    both = common.replace_block(once, "q", "other")
    assert "new table" in both and both.endswith("<!-- q:start -->\nother\n<!-- q:end -->\n")
    assert common.replace_block(both, "p", "third").count("<!-- q:start -->\nother") == 1


def test_replace_block_appends_when_markers_are_absent():
    assert common.replace_block("# T\n", "p", "x") == "# T\n\n<!-- p:start -->\nx\n<!-- p:end -->\n"


def test_markdown_table_shape_and_row_length_check():
    t = common.markdown_table(["a", "b"], [[1, None], ["x|y", 2.5]])
    assert t.splitlines() == ["| a | b |", "|---|---|", "| 1 | – |", "| x\\|y | 2.5 |"]
    with pytest.raises(ValueError, match="one cell per header"):
        common.markdown_table(["a", "b"], [[1]])


def test_write_json_atomic_is_strict_json_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "r.json"
    common.write_json_atomic(path, {"a": [1.5, float("nan")], "b": float("inf")})
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(c)) == {
        "a": [1.5, None], "b": None}
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]


def test_child_peak_rss_counts_the_child_and_not_the_parent(tmp_path):
    # The parent holds 300 MB; a child that allocates nothing must report far less.
    parent = np.ones(300 * 2**20 // 8)
    small_script = tmp_path / "small.py"
    small_script.write_text("import sys; print('ok', sys.argv[1:])")
    out, small = common.run_script_with_peak_rss(small_script, ["a", 2])
    assert out.strip() == "ok ['a', '2']"
    assert small < 150 * 2**20
    big_script = tmp_path / "big.py"
    big_script.write_text("b = bytearray(200 * 2**20)\nb[::4096] = b'x' * len(b[::4096])\n")
    _, big = common.run_script_with_peak_rss(big_script)
    assert big > 200 * 2**20
    del parent


def test_child_peak_rss_survives_sys_exit_and_reports_failure(tmp_path):
    ok = tmp_path / "ok.py"
    ok.write_text("import sys\nif __name__ == '__main__':\n    sys.exit(0)\n")
    assert common.run_script_with_peak_rss(ok)[1] > 0
    bad = tmp_path / "bad.py"
    bad.write_text("import sys; sys.exit(3)")
    with pytest.raises(RuntimeError, match="exit code 3"):
        common.run_script_with_peak_rss(bad)


def test_peak_rss_self_is_at_least_current_allocation():
    a = np.ones(64 * 2**20 // 8)
    assert common.peak_rss_self_bytes() > 64 * 2**20
    del a


def test_machine_info_reports_cores_and_versions():
    info = common.machine_info(("numpy", "surely-not-installed-pkg"))
    assert info["cores"] >= 1
    assert info["versions"]["numpy"] == np.__version__
    assert info["versions"]["surely-not-installed-pkg"] is None
    assert sys.version.startswith(info["python"])


def test_fmt_ms_keeps_three_figures_and_never_prints_exponents():
    assert common.fmt_ms(2.594) == "2.59"
    assert common.fmt_ms(999.9) == "1,000"
    assert common.fmt_ms(55116.2) == "55,116"
    assert common.fmt_ms(None) is None
