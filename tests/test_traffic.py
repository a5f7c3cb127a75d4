"""Synthetic traffic on the shared router: exact contention-free latencies, the acceptance
figures (8x8 uniform: near zero-load at 0.02, saturation at 0.6), and the CLI."""

import json

import pytest

from wse_sim import router
from wse_sim.cli import main
from wse_sim.traffic import RouterTiming, mean_hops, run_traffic


@pytest.mark.parametrize("hop_latency", [1, 2])
def test_contention_free_latency_is_exact(hop_latency):
    # 4 x 1 mesh, neighbor pattern: nodes 0..2 send 1 hop east, node 3 sends 3 hops west.
    # Every link and every ejection ramp has a single source, and a node creates at most
    # one packet per cycle, so even at rate 1 nothing waits: latency = 1 + L * hops.
    r = run_traffic(4, 1, "neighbor", 1.0, 200, warmup=10,
                    router=RouterTiming(hop_latency=hop_latency))
    assert r.mean_hops == pytest.approx(1.5)
    assert r.latency_avg == pytest.approx(1 + hop_latency * 1.5)
    assert r.latency_max == 1 + hop_latency * 3
    assert r.offered == r.accepted == 1.0  # every link saturated at one wavelet per cycle
    assert r.unfinished_packets == 0


def test_mean_hops_closed_forms():
    assert mean_hops(8, 8, "uniform") == pytest.approx(2 * 8 / 3)  # 2k/3 excluding self
    assert mean_hops(16, 16, "transpose") == pytest.approx(2 * 17 / 3)  # 2(k+1)/3
    assert mean_hops(16, 16, "neighbor") == pytest.approx(2 * 15 / 16)  # 2(k-1)/k
    # Hotspot: 20% to the center (mean distance to it), 80% uniform, center sends uniform.
    assert 0.2 * 4 + 0.8 * 2 * 8 / 3 - 0.1 < mean_hops(8, 8, "hotspot") < 2 * 8 / 3


def test_uniform_low_load_near_zero_load_latency():
    r = run_traffic(8, 8, "uniform", 0.02, 10_000, warmup=1000)
    assert r.zero_load_latency == pytest.approx(1 + 16 / 3)
    assert abs(r.latency_avg - r.zero_load_latency) <= 0.1 * r.zero_load_latency
    assert r.accepted == pytest.approx(0.02, rel=0.05)
    assert r.unfinished_packets == 0


def test_uniform_saturates_below_the_bisection_bound():
    r = run_traffic(8, 8, "uniform", 0.6, 3000, warmup=1000, drain=0)
    assert r.offered == pytest.approx(0.6, rel=0.03)
    assert 0.30 <= r.accepted <= 0.5  # 4/k = 0.5 bounds uniform traffic on a k x k mesh
    assert r.unfinished_packets > 0  # source queues grow without bound past saturation


def test_seeded_and_deterministic():
    a = run_traffic(8, 8, "hotspot", 0.05, 500, warmup=100, seed=7).to_json()
    b = run_traffic(8, 8, "hotspot", 0.05, 500, warmup=100, seed=7).to_json()
    c = run_traffic(8, 8, "hotspot", 0.05, 500, warmup=100, seed=8).to_json()
    assert a == b and a != c


def test_latencies_split_between_stripe_and_shared_histograms(monkeypatch, all_workers):
    # Latencies below NEAR_LATENCY_BINS count in the ejecting stripe's own histogram, the
    # rest in the shared one: split at 4 cycles instead, most land in the shared one, and
    # the results (the p99 latency included) are the default split's on any thread count.
    def run(threads):
        return run_traffic(8, 8, "uniform", 0.6, 300, warmup=50, drain=0,
                           threads=threads).to_json()

    want = run(1)
    monkeypatch.setattr(router, "NEAR_LATENCY_BINS", 4)
    for threads in (1, 2, 4):
        assert run(threads) == want


def test_cli_json(capsys):
    assert main(["traffic", "--mesh", "4x4", "--pattern", "transpose", "--rate", "0.05",
                 "--cycles", "500", "--warmup", "100", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["nodes"] == 16 and out["cycles"] == 500
    # transpose on 4 x 4: the 4 diagonal nodes send nothing, the others 2|x - y| hops
    assert out["mean_hops"] == pytest.approx(40 / 12)
    assert out["zero_load_latency"] == pytest.approx(1 + out["mean_hops"])
    assert out["latency_max"] >= out["latency_p99"] >= out["latency_avg"]
    assert out["latency_avg"] >= out["zero_load_latency"]
    # far below saturation every measured packet arrives, offered = accepted
    assert out["unfinished_packets"] == 0
    assert out["measured_packets"] == round(out["offered"] * 16 * 500)
    assert out["accepted"] == pytest.approx(out["offered"], rel=0.05)


def test_cli_user_errors(capsys):
    assert main(["traffic", "--mesh", "4x8", "--pattern", "transpose", "--rate", "0.1"]) == 2
    assert "transpose needs a square mesh" in capsys.readouterr().err


def test_cli_json_of_a_run_without_latencies_is_strict(capsys):
    # neighbor traffic on a one-column mesh: every node would send to itself, so none sends
    silent = ["traffic", "--mesh", "1x4", "--pattern", "neighbor", "--rate", "0.1", "--cycles",
              "1", "--warmup", "0"]
    assert main([*silent, "--json"]) == 0
    out = json.loads(capsys.readouterr().out, parse_constant=pytest.fail)  # no NaN
    assert out["measured_packets"] == 0
    why = "no packet was created in the measurement window"
    assert out["null_reasons"] == dict.fromkeys(("latency_avg", "latency_p99", "latency_max"), why)
    assert out["latency_avg"] is out["latency_p99"] is out["latency_max"] is None
    assert main(silent) == 0
    assert f"latency: n/a ({why})" in capsys.readouterr().out
