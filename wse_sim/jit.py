"""numba settings of the cycle loop, its cache guard, and the barrier its worker threads meet at.

Cache. numba caches compiled code per source file (`cache=True`) and reuses it while that
file is unchanged; but the loops of `engine.py` and `traffic.py` compile in the router
helpers of `router.py`, the helpers here, the record layouts of `state.py` and the enums of
`program.py`. So on import this module hashes every file in ENGINE_SOURCES and, when the
hash differs from the one stored beside the cache, deletes the cache files of all of them:
an edit to any of them recompiles every loop (stale machine code cannot run).

Barrier. The worker threads of a run (`wse_sim.threads`) meet twice per simulated cycle at
`barrier` (a spinning barrier on atomics: a cycle of a small fabric lasts microseconds,
too short to sleep and wake a thread; after a while a waiting thread yields its core).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.core.caching import FunctionCache
from numba.extending import intrinsic

PACKAGE = Path(__file__).resolve().parent
ENGINE_SOURCES = ("program.py", "state.py", "jit.py", "router.py", "engine.py", "traffic.py")
STAMP = "engine-sources.sha256"

# The cycle loop's functions. `_nrt=False`: they allocate nothing, and numba's reference
# counting of array arguments (an atomic call per array per function call) would otherwise
# cost more than the simulation itself. `nogil`: worker threads run them in parallel.
hot = njit(cache=True, nogil=True, _nrt=False, error_model="numpy")
hot_inline = njit(cache=True, nogil=True, _nrt=False, error_model="numpy", inline="always")


def _cache_dir() -> Path | None:
    """The folder numba keeps this package's compiled code in, chosen (and made) as numba
    does for any function here: NUMBA_CACHE_DIR, else the package's __pycache__ if writable,
    else the user's cache folder; None if numba can cache nowhere. Asked of numba, not
    guessed: a folder it has not used yet must get the stamp now, or the next process would
    take what this one caches there for stale."""
    try:
        return Path(FunctionCache(drop_stale_cache).cache_path)
    except (OSError, RuntimeError):
        return None


def drop_stale_cache() -> None:
    """Delete the cached code of ENGINE_SOURCES if any of those files changed since it was
    stored (called once, on import, before any cached function is loaded)."""
    cache = _cache_dir()
    if cache is None:
        return
    digest = hashlib.sha256()
    for name in ENGINE_SOURCES:
        digest.update((PACKAGE / name).read_bytes())
    stamp = digest.hexdigest()
    marker = cache / STAMP
    try:
        if marker.exists() and marker.read_text() == stamp:
            return
        for name in ENGINE_SOURCES:
            for path in cache.glob(f"{Path(name).stem}.*.nb[ic]"):
                path.unlink(missing_ok=True)
        tmp = cache / f"{STAMP}.{os.getpid()}"
        tmp.write_text(stamp)
        tmp.replace(marker)
    except OSError:  # a read-only folder: numba will not write a cache there either
        return


drop_stale_cache()


def _item_pointer(context, builder, sig, args):
    aryty = sig.args[0]
    ary = context.make_array(aryty)(context, builder, args[0])
    return cgutils.get_item_pointer(context, builder, aryty, ary, [args[1]])


@intrinsic
def atomic_add(typingctx, ary, index, value):
    """ary[index] += value atomically; returns the old value (int64 arrays)."""
    sig = types.int64(ary, types.intp, types.int64)

    def codegen(context, builder, sig, args):
        ptr = _item_pointer(context, builder, sig, args)
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")

    return sig, codegen


@intrinsic
def atomic_load(typingctx, ary, index):
    """ary[index], read atomically (int64 arrays)."""
    sig = types.int64(ary, types.intp)

    def codegen(context, builder, sig, args):
        ptr = _item_pointer(context, builder, sig, args)
        return builder.load_atomic(ptr, "seq_cst", 8)

    return sig, codegen


@intrinsic
def float_bits(typingctx, value):
    """The bits of a float32, as a non-negative int64 (a wavelet's data)."""
    sig = types.int64(types.float32)

    def codegen(context, builder, sig, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

    return sig, codegen


@intrinsic
def bits_float(typingctx, bits):
    """The float32 whose bits are the low 32 of an int64."""
    sig = types.float32(types.int64)

    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.trunc(args[0], ir.IntType(32)), ir.FloatType())

    return sig, codegen


@intrinsic
def trailing_zeros(typingctx, bits):
    """The index of the lowest set bit of a non-zero uint64."""
    sig = types.int64(types.uint64)

    def codegen(context, builder, sig, args):
        fn = builder.module.declare_intrinsic("llvm.cttz", [ir.IntType(64), ir.IntType(1)])
        return builder.call(fn, [args[0], ir.Constant(ir.IntType(1), 1)])

    return sig, codegen


sched_yield = types.ExternalFunction("sched_yield", types.int32())
COUNT, GENERATION = 0, 8  # barrier words, a cache line apart
SPINS = 1 << 12  # spins before a waiting worker yields its core


@hot
def barrier(bar, workers):
    """Wait until all `workers` threads have called it (a no-op for one)."""
    if workers == 1:
        return
    generation = atomic_load(bar, GENERATION)
    if atomic_add(bar, COUNT, 1) == workers - 1:
        bar[COUNT] = 0  # nobody touches it until the generation moves on
        atomic_add(bar, GENERATION, 1)
        return
    spins = 0
    while atomic_load(bar, GENERATION) == generation:
        spins += 1
        if spins >= SPINS:
            sched_yield()
