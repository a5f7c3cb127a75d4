"""Host memory: what this machine has free, and refusing work that cannot fit in it.

Before a command allocates, it estimates what it will need (a `Footprint`) and `require`
refuses an estimate above the memory available, in one line naming the field or option
that makes it so large, instead of a numpy allocation traceback, or swapping until the
machine stalls. Estimates count the big items only, so they are lower bounds: what is
refused could not have run; what passes may still be tight.

Available memory is MemAvailable of /proc/meminfo (what the kernel can hand out without
swapping), else the free physical pages os.sysconf reports; if neither is known, nothing
is refused.

Estimators here are for what the simulator core builds (`program_bytes`, `mesh_bytes`);
the compiler's live in `compiler.footprint`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from wse_sim.errors import UserError
from wse_sim.program import BYTES_PER_WORD, CODE_INSTR, CODE_OPERAND, Program
from wse_sim.state import FIFO, INSTR, OPERAND, OPERANDS, ROUTE, ROUTER, SOURCE, WAVELET

MEMINFO = "/proc/meminfo"
# Per PE of a fabric, whatever runs on it: the 18 int64 counters of wse_sim.stats.Stats.
STATS_BYTES_PER_PE = 18 * 8
# Router state per node in packet mode (wse_sim.router.build_fabric, wse_sim.traffic), from
# the record layouts of wse_sim.state: one input FIFO per link and one for the ramp, each a
# FIFO record and its wavelet slots (`depth` rounded up to a power of two);
# per node a ROUTE, a ROUTER and a SOURCE record and four 8-byte words (its PE index, its
# occupied-FIFO mask, its entries of the two router lists, its wake-up slot).
_FIFO_BYTES = FIFO.dtype.itemsize
_NODE_BYTES = ROUTE.dtype.itemsize + ROUTER.dtype.itemsize + SOURCE.dtype.itemsize + 4 * 8
# An instruction of a program: its row of `read_code`'s arrays and the engine's INSTR and
# OPERAND records (both are held while the assembler reads the one into the other).
_CODE_BYTES = (CODE_INSTR.itemsize + OPERANDS * CODE_OPERAND.itemsize + INSTR.dtype.itemsize
               + OPERANDS * OPERAND.dtype.itemsize)

@dataclass(frozen=True)
class Footprint:
    """`need` bytes for `what` ("the step", "the mesh"); `blame()` gives the field or
    option that makes it so large and a detail, computed only when refusing."""

    what: str
    need: int
    blame: Callable[[], tuple[str, str]]


def available_bytes() -> int | None:
    """Bytes of memory this machine can give without swapping; None if unknown."""
    try:
        with open(MEMINFO, encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the file says kB: KiB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def require(footprint: Footprint, source: str | None = None) -> None:
    """UserError (prefixed by `source`, a file) if `footprint` needs more than is
    available."""
    available = available_bytes()
    if available is None or footprint.need <= available:
        return
    field, detail = footprint.blame()
    prefix = f"{source}: " if source else ""
    raise UserError(f"{prefix}{field}: too large for this machine's memory: {footprint.what} "
                    f"needs at least {human_bytes(footprint.need)} ({detail}), "
                    f"{human_bytes(available)} available")


def human_bytes(count: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} B" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def program_bytes(program: Program) -> Footprint:
    """What simulating `program` allocates: the SRAM pool (BYTES_PER_WORD per word each PE
    allocates), the counters of every PE of its fabric (`STATS_BYTES_PER_PE`), its code
    (`_CODE_BYTES` an instruction: read as arrays by validation while the assembler turns
    it into engine records) and the memory service's words (every inbound word is copied
    into the fabric, every outbound word expected has a slot there). The engine's
    per-thread and per-route state is not counted."""
    words = sum(pe.sram_words for pe in program.pes.values())
    instructions = sum(len(task.instrs) for pe in program.pes.values() for task in pe.tasks)
    edge = sum(len(p.data) if p.inbound else p.expected for p in program.ports)
    pes = len(program.pes)
    parts = {  # bytes, and what they are
        "sram_words": (BYTES_PER_WORD * words, f"{words:,} SRAM words over {pes:,} PEs"),
        "fabric": (STATS_BYTES_PER_PE * program.width * program.height,
                   f"{program.width:,} x {program.height:,} PEs"),
        "instructions": (_CODE_BYTES * instructions,
                         f"{instructions:,} instructions over {pes:,} PEs"),
        "ports": (BYTES_PER_WORD * edge,
                  f"{edge:,} words through {len(program.ports):,} edge ports"),
    }

    def blame() -> tuple[str, str]:
        part = max(parts, key=lambda name: parts[name][0])
        return part, parts[part][1]

    return Footprint("the simulation", sum(need for need, _ in parts.values()), blame)


def mesh_bytes(width: int, height: int, depth: int) -> Footprint:
    """The router state of a `width` x `height` packet-mode mesh with FIFOs of `depth`
    wavelets, plus the counters of its PEs (see the constants above). Temporaries of the
    set-up are not counted."""
    nodes = width * height
    fifos = 5 * nodes - 2 * width - 2 * height  # a ramp FIFO per node, two per link
    slots = (1 << max(depth - 1, 0).bit_length()) * WAVELET.dtype.itemsize
    need = fifos * (_FIFO_BYTES + slots) + nodes * (_NODE_BYTES + STATS_BYTES_PER_PE)

    def blame() -> tuple[str, str]:
        option = "queue_depth" if fifos * slots > need - fifos * slots else "mesh"
        return option, f"{width:,} x {height:,} nodes, FIFOs of {depth:,} wavelets"

    return Footprint("the mesh", need, blame)
