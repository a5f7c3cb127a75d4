"""Router timing and flow control, with every expected cycle count derived by hand.

Latency model (wse_sim.engine docstring): a wavelet sent by a FABOUT element in cycle t
leaves its router at t + 1, crosses h links of hop_latency L, enters the receiver's queue
at t + 1 + h*L and is consumed at t + h*L + 2.
"""

import numpy as np
import pytest
from programs import RAMP, E, N, S, W, route_east, send_east

from wse_sim.engine import simulate
from wse_sim.hardware import WaferConfig
from wse_sim.program import FabIn, FabOut, Mem, Op, Program, Task, Trigger, port_mask, vec


def wafer(**kw) -> WaferConfig:
    return WaferConfig(width=16, height=16, **kw)


@pytest.mark.parametrize("hops", [1, 2, 5])
@pytest.mark.parametrize("hop_latency", [1, 2])
def test_single_wavelet_latency(hops, hop_latency):
    r = simulate(send_east(1, hops), wafer(hop_latency=hop_latency))
    consumed = hops * hop_latency + 2  # sent in cycle 0
    assert r.stats.first_cycle[0, hops] == consumed
    assert r.cycles == consumed + 1  # the run ends at the first cycle with nothing left
    assert r.sram(hops, 0)[0] == 0.0
    assert list(r.stats.link[1, 0, :hops]) == [1] * hops  # one E crossing per link


def test_saturated_link_one_wavelet_per_cycle():
    n, hops = 100, 3
    r = simulate(send_east(n, hops), wafer(queue_depth=2))
    # Sent in cycles 0..n-1 without a stall, consumed in cycles 5..n+4: one per cycle.
    assert r.stats.first_cycle[0, 0] == 0 and r.stats.last_cycle[0, 0] == n - 1
    assert r.stats.first_cycle[0, hops] == hops + 2
    assert r.stats.last_cycle[0, hops] == n - 1 + hops + 2
    assert r.cycles == n + hops + 2
    assert r.stats.stalled.sum() == hops + 2  # only the receiver, before the first arrival
    np.testing.assert_array_equal(r.sram(hops, 0), 2 * np.arange(n, dtype=np.float32))


def test_depth_one_halves_link_rate():
    # Depth 1: a slot freed in cycle t is refilled at t + 1 at the earliest, so each FIFO
    # holds a wavelet for 2 cycles: sends in cycles 0, 2, 4, ..., consumed at 2j + hops + 2.
    n, hops = 10, 3
    r = simulate(send_east(n, hops), wafer(queue_depth=1))
    assert r.stats.last_cycle[0, hops] == 2 * (n - 1) + hops + 2
    assert r.cycles == 2 * n + hops + 1


def test_slow_consumer_depth_one_nothing_lost_or_reordered():
    # The receiver's MUL gets fp32 credit 0.25 per cycle: one element every 4 cycles. It
    # starts with full credit, so it consumes at 5, 9, 13, ... (first arrival at hops+2=5).
    n, hops = 30, 3
    r = simulate(send_east(n, hops), wafer(queue_depth=1, fp32_ops_per_cycle=0.25))
    np.testing.assert_array_equal(r.sram(hops, 0), 2 * np.arange(n, dtype=np.float32))
    assert r.stats.last_cycle[0, hops] == hops + 2 + 4 * (n - 1)
    assert r.cycles == hops + 2 + 4 * (n - 1) + 1
    assert r.stats.injected == r.stats.delivered == n


def test_multicast_reaches_every_target():
    # PE (1, 1) sends n wavelets on color 1 to itself and its four neighbours at once.
    n = 6
    p = Program(3, 3)
    src = p.pe(1, 1, 2 * n)
    src.load(0, np.arange(1, n + 1, dtype=np.float32))
    src.tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, FabOut(1), Mem(0))]))
    src.tasks.append(Task(1, Trigger.RESET, [vec(Op.MOV, n, Mem(n), FabIn(1))]))
    p.add_route(1, 1, 1, port_mask(RAMP), port_mask(N, E, S, W, RAMP))
    targets = {(1, 0): S, (2, 1): W, (1, 2): N, (0, 1): E}
    for (x, y), rx in targets.items():
        pe = p.pe(x, y, n)
        pe.tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, Mem(0), FabIn(1))]))
        p.add_route(x, y, 1, port_mask(rx), port_mask(RAMP))
    r = simulate(p, wafer())
    data = np.arange(1, n + 1, dtype=np.float32)
    for x, y in targets:
        np.testing.assert_array_equal(r.sram(x, y), data)
        assert r.stats.first_cycle[y, x] == 3  # one hop: 0 + 1 + 2
    np.testing.assert_array_equal(r.sram(1, 1)[n:], data)
    assert r.stats.first_cycle[1, 1] == 0  # it sends at 0; receives its own copy at 2
    assert list(r.stats.link[:, 1, 1]) == [n] * 4
    assert r.stats.injected == 5 * n == r.stats.delivered  # n sent + 4n multicast copies
    assert r.cycles == n - 1 + 3 + 1


def test_two_colors_share_a_link_and_both_progress():
    # PE (0, 0) sends color 1 to PE (3, 0) and color 2 to PE (2, 0) over the same links.
    # PE (2, 0) only starts consuming color 2 after a 200-element local copy, so color 2
    # backs up to the sender; color 1 must still get through at full speed.
    n, busy = 20, 200
    p = Program(4, 1)
    src = p.pe(0, 0, 2 * n)
    src.load(0, np.arange(2 * n, dtype=np.float32))
    src.tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, FabOut(1), Mem(0))]))
    src.tasks.append(Task(1, Trigger.RESET, [vec(Op.MOV, n, FabOut(2), Mem(n))]))
    slow = p.pe(2, 0, n + 2 * busy)
    slow.tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, busy, Mem(n + busy), Mem(n)),
                                              vec(Op.MOV, n, Mem(0), FabIn(2))]))
    fast = p.pe(3, 0, n)
    fast.tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, Mem(0), FabIn(1))]))
    route_east(p, 1, 0, 3, 0)
    route_east(p, 2, 0, 2, 0)
    r = simulate(p, wafer())
    np.testing.assert_array_equal(r.sram(3, 0), np.arange(n, dtype=np.float32))
    np.testing.assert_array_equal(r.sram(2, 0)[:n], np.arange(n, 2 * n, dtype=np.float32))
    # Color 1 alone would finish at n - 1 + 3 + 2; sharing the ramp with color 2 at worst
    # halves its rate until color 2 is blocked.
    assert r.stats.last_cycle[0, 3] <= 2 * n + 3 + 2
    assert r.stats.last_cycle[0, 2] == busy + n - 1  # color 2 waits for its consumer
    assert list(r.stats.color_hops[1:3]) == [3 * n, 2 * n]
