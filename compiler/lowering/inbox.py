"""Receiving rows on a thread of their own, and per-row programs as REPEAT bodies.

Why a receiving thread. Between two product kernels that take about a thousand cycles per
row sits a kernel that either keeps pace or makes both wait. A matmul emits a row element
by element as its dot products finish (one element every K cycles), so a consumer that
reads a row and then computes spends the producer's whole row time reading: each row costs
the sum of both kernels' row times instead of the larger. A kernel that reads a block of
rows, computes and emits it makes the same sum with its consumer. So every kernel input is
received by a thread of its own (an *inbox*) into SRAM, with a `Tokens` signal per row;
the compute thread waits for a row's token, computes it and emits it, while the next row
arrives. The receiving thread shares the PE's SRAM write port and its ramp with the compute
thread, so a row received costs the compute thread at most its width in cycles, and less
when the compute thread is not writing.

An inbox stores either every row (rows the backward needs again: the matmul's x, the
LayerNorm's xhat) or a ring of `RING` slots whose reuse is flow-controlled by credits: the
compute thread signals a `free` token when it is done with a slot, and the receiving
thread waits for one before it writes the slot. Deadlock (compiler.lowering.kernel): the
receiving thread is its stream's only reader and reads it in row order; it waits only for
the compute thread to finish an earlier row, which needs nothing from later rows.

REPEAT bodies. The engine runs one level of REPEAT with memory operands that advance by a
fixed `loop_stride` per iteration. A per-row program whose operands are affine in the row
(a stored row, a row statistic) is one REPEAT over the rows; with a ring of R slots it is
one REPEAT over rounds of R rows (`rounds`). A kernel then has a few dozen instructions per
PE whatever its row count, which keeps compilation fast.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from compiler.lowering.ir import FabIn, Instr, Mem, Op, Operand, repeat, vec
from compiler.lowering.kernel import Kernel, LocalPE, StreamIds, Tokens

PerPE = dict[LocalPE, list[Instr]]
Span = tuple[int, int]

# Slots of an inbox ring: the receiving thread fills one while the compute thread works on
# the other.
RING = 2


@dataclass(frozen=True)
class RowStore:
    """`count` rows of `width` words at `offset`, row-major: every row of a tensor, or a
    ring of `ring` row slots that row i reuses as slot i % ring. `half`: fp16 elements
    (offset and width count halves), converted from the fp32 wavelets as they arrive."""

    offset: int
    width: int
    count: int
    ring: int | None = None
    half: bool = False

    def row(self, i: int, loop: int, *, backwards: bool = False) -> Operand:
        """Row i (row count - 1 - i if `backwards`) as a vector operand that advances by
        `loop` rows per REPEAT iteration (see `rounds`)."""
        return self._at(i, loop, backwards, stride=1)

    def scalar(self, i: int, loop: int, *, backwards: bool = False) -> Operand:
        """Word 0 of row i (of a width-1 store: element i) as a scalar operand."""
        return self._at(i, loop, backwards, stride=0)

    def _at(self, i: int, loop: int, backwards: bool, stride: int) -> Operand:
        if self.ring is not None:
            return Mem(self.offset + (i % self.ring) * self.width, stride, half=self.half)
        if backwards:
            return Mem(self.offset + (self.count - 1 - i) * self.width, stride,
                       -loop * self.width, half=self.half)
        return Mem(self.offset + i * self.width, stride, loop * self.width, half=self.half)


def join(body: PerPE, more: PerPE) -> None:
    """Append `more`'s instructions to each PE's in `body`."""
    for pe, instrs in more.items():
        body.setdefault(pe, []).extend(instrs)


def rounds(items: range, length: int, body: Callable[[int, int], PerPE]) -> PerPE:
    """Each PE's instructions for `items` (rows), `body(i, loop)` giving item i's: the
    first `length` items are the body of a REPEAT run len(items) // length times (loop =
    length: an operand of item i at offset + i * step advances by length * step per
    iteration, a ring slot i % length stays when length is a multiple of the ring), the
    remaining items follow it (loop = 0)."""
    out: PerPE = {}
    full = len(items) // length
    if full:
        first = [body(i, length) for i in items[:length]]
        for pe in first[0]:
            out[pe] = repeat(full, [ins for item in first for ins in item[pe]])
    for i in items[full * length:]:
        join(out, body(i, 0))
    return out


def receiving_thread(kernel: Kernel, pe: LocalPE) -> int:
    """A new thread of `pe` for receiving (thread 0, the compute thread, exists first)."""
    if kernel.new_thread(pe) == 0:
        kernel.emit(pe)
    return kernel.new_thread(pe)


@dataclass(frozen=True)
class Inbox:
    """Rows of one input stream in `store`, received on a thread of their own: `take()`
    before row i is read, `release()` after (a ring slot's credit)."""

    store: RowStore
    ready: Tokens
    free: Tokens | None

    def open(self) -> list[Instr]:
        """The compute thread's first credits of a ring, just before its loop over the
        rows (not earlier, so a kernel's first work is its first row's)."""
        return [self.free.signal()] * self.store.ring if self.free and self.store.ring else []

    def take(self) -> list[Instr]:
        return [self.ready.wait()]

    def release(self) -> list[Instr]:
        return [self.free.signal()] if self.free is not None else []

    @property
    def length(self) -> int:
        """Rows per REPEAT round of a program that reads this inbox (see `rounds`)."""
        return self.store.ring or 1


def inbox(kernel: Kernel, pe: LocalPE, ids: StreamIds, stream: int | list[tuple[int, Span]],
          store: RowStore, *, queue_depth: int, backwards: bool = False,
          after: Inbox | None = None) -> Inbox:
    """Receive `store.count` rows of `stream` on a new thread of `pe`, row i into
    `store.row(i)` (stored from the last row back if `backwards`); `stream` may be several
    lanes, (stream, columns of the row) each, received one after the other per row. The
    compute thread signals a ring store's first credits (`Inbox.open`).

    `after`: an inbox the compute thread has taken every row of when it opens this one
    (the forward's, for a backward ring): both then signal on one channel, since this
    one's first signal needs a credit given after the other's last token was taken. A
    channel is a color at the PE, and fewer streams route faster."""
    parts = [(stream, (0, store.width))] if isinstance(stream, int) else stream
    if after is not None and store.ring is None:
        raise ValueError(f"kernel {kernel.name}: only a ring inbox can follow another")
    ready = after.ready if after is not None else Tokens.create(kernel, pe, ids, queue_depth)
    free = None
    thread = receiving_thread(kernel, pe)
    if store.ring is not None:
        free = Tokens.create(kernel, pe, ids, queue_depth)
        if store.ring > free.capacity:
            raise ValueError(f"kernel {kernel.name}: a ring of {store.ring} slots needs "
                             f"more than {free.capacity} credits")
    box = Inbox(store, ready, free)

    def receive(i: int, loop: int) -> PerPE:
        wait = [free.wait()] if free is not None else []
        row = store.row(i, loop, backwards=backwards)
        return {pe: [*wait, *(vec(Op.MOV, c1 - c0,
                                  Mem(row.offset + c0, 1, row.loop_stride, half=store.half),
                                  FabIn(s)) for s, (c0, c1) in parts), ready.signal()]}

    # after the last row, the credits of the last `ring` rows (none is left stranded)
    drain = [free.wait()] * store.ring if free is not None and store.ring else []
    kernel.emit(pe, *rounds(range(store.count), box.length, receive)[pe], *drain, thread=thread)
    return box
