"""Hand-built Programs for the engine tests, and how two runs are compared."""

from __future__ import annotations

import numpy as np

from wse_sim.program import (
    FabIn,
    FabOut,
    Imm,
    Mem,
    Op,
    Port,
    Program,
    Reg,
    Task,
    Trigger,
    port_mask,
    repeat,
    vec,
)

N, E, S, W, RAMP = Port.N, Port.E, Port.S, Port.W, Port.RAMP


def route_east(p: Program, color: int, x0: int, x1: int, y: int) -> None:
    """A unicast path for `color` from PE (x0, y)'s RAMP east to PE (x1, y)'s RAMP."""
    p.add_route(x0, y, color, port_mask(RAMP), port_mask(E))
    for x in range(x0 + 1, x1):
        p.add_route(x, y, color, port_mask(W), port_mask(E))
    p.add_route(x1, y, color, port_mask(W), port_mask(RAMP))


def send_east(n: int, hops: int, color: int = 1, width: int | None = None) -> Program:
    """PE (0, 0) sends words 0..n-1 of its SRAM east over `hops` links; the receiver
    stores 2 * value. Data: 0, 1, ..., n-1."""
    p = Program(width or hops + 1, 1)
    src = p.pe(0, 0, n)
    src.load(0, np.arange(n, dtype=np.float32))
    src.tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, FabOut(color), Mem(0))]))
    dst = p.pe(hops, 0, n)
    dst.tasks.append(Task(0, Trigger.RESET, [vec(Op.MUL, n, Mem(0), FabIn(color), Imm(2.0))]))
    route_east(p, color, 0, hops, 0)
    return p


def slow_consumer(n: int, work: int) -> Program:
    """PE (0, 0) sends words 0..n-1 east to PE (1, 0), which takes the first, computes for
    `work` cycles (an FMA of `work` elements), then takes the other n - 1."""
    p = Program(2, 1)
    p.pe(0, 0, n).tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, n, FabOut(1), Mem(0))]))
    p.pe(1, 0, work).tasks.append(Task(0, Trigger.RESET, [
        vec(Op.MOV, 1, Mem(0), FabIn(1)),
        vec(Op.FMA, work, Mem(0), Mem(0), Imm(2.0), Reg(0)),
        vec(Op.MOV, n - 1, Mem(0), FabIn(1))]))
    route_east(p, 1, 0, 1, 0)
    return p


def systolic_dot(a: np.ndarray, b: np.ndarray, pes: int) -> Program:
    """Dot product of a and b (length pes * k) on a 1 x pes row. PE i holds a[i*k:(i+1)*k]
    at word 0 and the same slice of b at word k, accumulates its partial sum in Reg 0
    (FMA dst=Reg 0), then adds the partial sum arriving from the west (color 1 on even
    links, 2 on odd links) and sends the total east; the last PE stores it at word 2k."""
    k = len(a) // pes
    p = Program(pes, 1)
    for i in range(pes):
        pe = p.pe(i, 0, 2 * k + 1)
        pe.load(0, a[i * k:(i + 1) * k])
        pe.load(k, b[i * k:(i + 1) * k])
        local = vec(Op.FMA, k, Reg(0), Mem(0), Mem(k), Reg(0))
        c_in, c_out = 1 + (i + 1) % 2, 1 + i % 2
        if i == 0:
            tail = vec(Op.MOV, 1, FabOut(c_out), Reg(0))
        elif i < pes - 1:
            tail = vec(Op.ADD, 1, FabOut(c_out), FabIn(c_in), Reg(0))
        else:
            tail = vec(Op.ADD, 1, Mem(2 * k), FabIn(c_in), Reg(0))
        pe.tasks.append(Task(0, Trigger.RESET, [local, tail]))
        if i < pes - 1:
            route_east(p, c_out, i, i + 1, 0)
    return p


def outer_product_matmul(a: np.ndarray, b: np.ndarray, grid: int) -> Program:
    """C = a @ b on grid x grid PEs, output-stationary. PE (x, y) owns the block
    C[y*mb:(y+1)*mb, x*nb:(x+1)*nb] at word 0. For each k, column k of a's row block flows
    east along row y (color 1, sent by PE (0, y)) and row k of b's column block flows south
    along column x (color 2, sent by PE (x, 0)); routers multicast each wavelet to the PE and
    onwards. Each PE stores the two vectors, then does mb FMA rows C[i, :] += a_k[i] * b_k."""
    m, kk = a.shape
    n = b.shape[1]
    mb, nb = m // grid, n // grid
    c_at, a_at, b_at = 0, mb * nb, mb * nb + mb
    p = Program(grid, grid)
    for y in range(grid):
        for x in range(grid):
            pe = p.pe(x, y, mb * nb + mb + nb + (mb * kk if x == 0 else 0)
                      + (kk * nb if y == 0 else 0))
            src = mb * nb + mb + nb
            if x == 0:  # the row's a block, column-major: column k is contiguous
                pe.load(src, a[y * mb:(y + 1) * mb].T)
                pe.tasks.append(Task(1, Trigger.RESET,
                                     [vec(Op.MOV, mb * kk, FabOut(1), Mem(src))]))
                src += mb * kk
            if y == 0:  # the column's b block, row-major: row k is contiguous
                pe.load(src, b[:, x * nb:(x + 1) * nb])
                pe.tasks.append(Task(2, Trigger.RESET,
                                     [vec(Op.MOV, kk * nb, FabOut(2), Mem(src))]))
            body = [vec(Op.MOV, mb, Mem(a_at), FabIn(1)), vec(Op.MOV, nb, Mem(b_at), FabIn(2))]
            body += [vec(Op.FMA, nb, Mem(c_at + i * nb), Mem(a_at + i, 0), Mem(b_at),
                         Mem(c_at + i * nb)) for i in range(mb)]
            pe.tasks.append(Task(0, Trigger.RESET, repeat(kk, body)))
            p.add_route(x, y, 1, port_mask(RAMP if x == 0 else W),
                        port_mask(RAMP, *([E] if x < grid - 1 else [])))
            p.add_route(x, y, 2, port_mask(RAMP if y == 0 else N),
                        port_mask(RAMP, *([S] if y < grid - 1 else [])))
    return p


def deadlock_pair() -> Program:
    """PE (0, 0) waits for color 3 from PE (1, 0) before sending color 4; PE (1, 0) waits for
    color 4 before sending color 3: neither ever sends."""
    p = Program(2, 1)
    for x, c_in, c_out in ((0, 3, 4), (1, 4, 3)):
        pe = p.pe(x, 0, 1)
        pe.tasks.append(Task(0, Trigger.RESET, [vec(Op.MOV, 1, Mem(0), FabIn(c_in)),
                                                vec(Op.MOV, 1, FabOut(c_out), Mem(0))]))
    route_east(p, 4, 0, 1, 0)
    p.add_route(1, 0, 3, port_mask(RAMP), port_mask(W))
    p.add_route(0, 0, 3, port_mask(E), port_mask(RAMP))
    return p


def assert_same_run(a, b):
    """Two SimResults with the same cycles and every counter equal."""
    assert a.cycles == b.cycles
    for name, value in vars(a.stats).items():
        np.testing.assert_array_equal(value, getattr(b.stats, name), err_msg=name)
