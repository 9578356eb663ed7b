"""`secdfd bench load`: many clients at once against real processes; every answer checked."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from secdfd.common.bench.load import LoadError, LoadPlan, parse_duration, run_load
from secdfd.common.cli.main import main
from secdfd.common.service import local

pytestmark = pytest.mark.processes


def test_clients_beyond_the_bound_are_told_busy_and_all_are_answered(tmp_path):
    """Three clients at once against servers that hold one request at a time: the extra requests are
    answered Busy at once, retried, and in the end every request is answered with the plaintext verdict."""
    res = run_load(LoadPlan(3, requests=6, size=32, images=3), tmp_path,
                   options=local.Options(depth=2, extra=("--max-pending", "1", "--max-pending-per-client", "1")))
    assert res["answered"] == res["requests"] == 6 and res["verdicts_wrong"] == 0 and res["errors"] == {}
    assert res["busy_retries"] > 0  # the bound was met and said so
    assert res["ledgers"]["consistent"] and res["ledgers"]["used_in_run"] == 6
    lat = res["latency_seconds"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["max"] and res["throughput_per_minute"] > 0
    assert set(res["peak_rss_mb"]) == {"dealer", "server_a", "server_b"} and min(res["peak_rss_mb"].values()) > 50
    assert not list(tmp_path.iterdir())  # the scratch deployment is removed


def test_a_short_soak_reports_slopes(tmp_path):
    r = CliRunner().invoke(main, ["bench", "load", "--clients", "2", "--duration", "25s", "--size", "32",
                                  "--work", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert res["answered"] >= 2 and res["verdicts_wrong"] == 0 and res["errors"] == {}
    for party in ("dealer", "server_a", "server_b"):
        s = res["slopes"][party]
        assert s["samples"] >= 4 and s["fds_end"] > 0 and s["rss_mb_end"] > 50
        assert len(s["rss_mb_mean_by_quarter"]) == 4 and min(s["rss_mb_mean_by_quarter"]) > 50
    assert res["ledgers"]["consistent"]


def test_plans_and_durations():
    assert parse_duration("90") == 90 and parse_duration("10m") == 600 and parse_duration("1h") == 3600
    with pytest.raises(LoadError):
        parse_duration("soon")
    with pytest.raises(LoadError):
        LoadPlan(2)
    with pytest.raises(LoadError):
        LoadPlan(3, requests=2)


@pytest.mark.parametrize("args, says", [
    (["--lan-rtt-ms", "0.5"], "--lan-rtt-ms is for `bench e2e`"),
    (["--lan", "1gbit", "--lan-rtt-ms", "0.5"], "--lan-rtt-ms is for `bench e2e`"),
    (["--report", "out"], "--report is for `bench e2e`"),
])
def test_options_of_bench_e2e_only_are_refused_before_anything_starts(tmp_path, args, says):
    r = CliRunner().invoke(main, ["bench", "load", "--requests", "1", "--work", str(tmp_path), *args])
    assert r.exit_code == 2 and says in r.output, r.output
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("tail, whole, last_half, quarters", [
    # 1 MB per sample (2 s): 1,800 MB/h throughout, the same in the last half
    (lambda t: 100.0 + t / 2, 1800.0, 1800.0, [119.5, 159.5, 199.5, 240.0]),
    # grows over the first half, then flat: the last half says 0 where the whole fit still rises
    (lambda t: 100.0 + min(t, 160.0) / 2, 469.936, 0.0, [119.5, 159.5, 180.0, 180.0]),
])
def test_slopes_tell_memory_that_settles_from_memory_that_grows(tail, whole, last_half, quarters):
    """161 samples 2 s apart (0..320 s): exact slopes and quarter means of a synthetic RSS series."""
    from secdfd.common.bench.load import Sampler

    sampler = Sampler({"server_a": 0})
    sampler.samples["server_a"] = [(float(t), tail(t), 30) for t in range(0, 321, 2)]
    s = sampler.slopes()["server_a"]
    assert s["rss_mb_per_hour"] == pytest.approx(whole, abs=1e-3)  # settled or not, the fit from 80 s rises
    assert s["rss_mb_per_hour_last_half"] == pytest.approx(last_half, abs=1e-9)
    assert s["rss_mb_mean_by_quarter"] == quarters
    assert s["fds_per_hour"] == 0 and s["fds_end"] == 30 and s["samples"] == 121
