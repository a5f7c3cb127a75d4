"""A new batch for a compiled step: the code of the kernels that read it, rebuilt in place.

The PE has no register-indexed addressing (an SRAM operand's offset is part of the
instruction), so a batch cannot be data the program reads: which embedding PE injects the
wte chunk of row m, where dh0 row m adds into the embedding gradient (`compiler.ops.
embedding`), and which cross-entropy PE picks row m's target logit and subtracts 1 from its
probability (`compiler.ops.cross_entropy`) are operands of instructions. On the hardware
these would be DSD offsets computed at run time from the token ids (CSL's runtime DSD
offsets); here the host writes them before each step, like an input DMA's descriptors.

`BatchCode(compiled).pe_tasks(batch)` is that rewrite, and nothing more (`batch` one
micro-batch of a step that has several, `training.micro_batch_size`):

* Only the kernels whose ops read an input of the graph are rebuilt (for a training step
  `tokens` and `targets`: the embedding + LM head kernel and the cross-entropy; for a
  generation step also `positions`: the KV-cache attention), by their families' own
  `lower`, for the new batch. Everything else of the compiled program stays: placement,
  orientation, routes and colors, every other kernel's code, and all of SRAM.
* A rebuilt kernel must have the compiled kernel's shape: the same streams in the same
  order (tensor, lane, columns, row order, PEs), the same local streams and the same SRAM
  allocation on every PE (so weights, gradients and moments keep their words); anything
  else is a compiler bug (AssertionError). Its symbolic stream ids are mapped to the
  compiled kernel's by that order, mirrored like the compiled kernel, and bound to the
  routed colors.
* The result (`BatchTasks`) is the new task list of every PE of those kernels whose code
  differs from the compiled program's (`Program` coordinates), and the number of
  instructions in the tasks that differ: what the host writes per step. A task the batch
  leaves as compiled is the compiled program's own `Task` (checked once: the kernels
  rebuilt for the compiled batch are the compiled code), so the engine need not validate
  or flatten it again (`wse_sim.engine.Loaded`).

Micro-batches. A step of several runs the program once per micro-batch (`wse_sim.step`);
the code of every micro-batch but the last leaves the optimizer's update out
(`pe_tasks(batch, defer_update=True)`: the kernels that hold parameters rebuilt with
`UpdateRule.deferred`, same streams and SRAM), so the gradients only accumulate. On the
hardware a loop counter would skip the update; here the host rewrites the code, and the
rewrite counts the instructions of those kernels too.

The rewrite takes no simulated time: the simulated step starts with the new code in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compiler.compile import Compiled
from compiler.inputs import Batch
from compiler.lower import LoweringContext
from compiler.lowering.kernel import Kernel
from compiler.ops import family_of
from compiler.orient import flip_kernel
from compiler.routing import bound_program, bound_task
from wse_sim.program import Task

PE = tuple[int, int]


@dataclass(frozen=True)
class _Rebuild:
    """One kernel that reads the batch: the graph op its family lowers it from, the colors
    of its streams in declaration order, its PEs' code for the compiled batch as a rebuild
    makes it (unbound stream ids: a rebuild's are the same for any batch), and the ids of
    its streams that end with a control wavelet (`Linked.switched`, in a rebuild's ids)."""

    op: str
    colors: tuple[int, ...]
    tasks: dict[tuple[int, int], list[Task]]
    switched: frozenset[int]


class BatchCode:
    """Rebuilds the batch-dependent code of a compiled step (module docstring)."""

    def __init__(self, compiled: Compiled) -> None:
        self.compiled = compiled
        colors: dict[str, dict[int, int]] = {}
        for stream in compiled.linked.streams:
            for kernel_name, sid in stream.ends:
                colors.setdefault(kernel_name, {})[sid] = stream.color
        self.rebuilds: dict[str, _Rebuild] = {}
        graph = compiled.graph
        self.reading = {kernel.name for kernel in compiled.kernels
                        if any(graph.tensors[t].kind == "input" for name in kernel.ops
                               if name in graph.ops for t in graph.ops[name].inputs)}
        # kernels whose update a micro-batch before the step's last leaves out
        self.updating = {kernel.name for kernel in compiled.kernels
                         if compiled.cfg.training.micro_batches > 1
                         and any(graph.ops[name].kind == "update" for name in kernel.ops)}
        # the code without the update of each kernel in updating - reading (`_changed`)
        self._deferred: dict[str, tuple[dict[PE, list[Task]], int]] = {}
        for kernel in compiled.kernels:
            if kernel.name in self.reading | self.updating:
                base = self._build(kernel.name, kernel.ops[0], compiled.code_batch)
                switched = compiled.linked.switched.get(kernel.name, frozenset())
                rebuild = self.rebuilds[kernel.name] = _Rebuild(
                    kernel.ops[0], tuple(colors[kernel.name][s] for s in _streams(kernel)),
                    {pe: prog.tasks for pe, prog in base.programs.items()},
                    frozenset(new for old, new in zip(_streams(kernel), _streams(base),
                                                      strict=True) if old in switched))
                # pe_tasks keeps the compiled Task where a rebuild's task equals the base's
                bindings = _bindings(base, rebuild)
                for pe, prog in base.programs.items():
                    at = compiled.linked.kernel_pe(kernel.name, pe)
                    if (bound_program(prog, bindings, f"kernel {kernel.name} PE {pe}",
                                      rebuild.switched).tasks
                            != compiled.linked.program.pes[at].tasks):
                        raise AssertionError(f"kernel {kernel.name} PE {pe}: rebuilt for the "
                                             f"compiled batch, its code differs from the "
                                             f"compiled code")

    def _build(self, name: str, op: str, batch: Batch, defer_update: bool = False) -> Kernel:
        """Kernel `name` (started by graph op `op`) for `batch`, mirrored as compiled, its
        shape checked against the compiled kernel's."""
        compiled = self.compiled
        ctx = LoweringContext(compiled.graph, compiled.params, batch, compiled.plan,
                              defer_update=defer_update)
        kernel = flip_kernel(family_of(compiled.graph.ops[op]).lower(ctx, compiled.graph.ops[op]),
                             compiled.flips[name])
        _check_same_shape(compiled.linked.kernels[name], kernel)
        return kernel

    def pe_tasks(self, batch: Batch, *, defer_update: bool = False) -> BatchTasks:
        """The tasks of every PE whose code differs for `batch` (program coordinates);
        `defer_update`: the code of a micro-batch before the step's last (module
        docstring)."""
        _check_batch(batch, self.compiled)
        changed: dict[PE, list[Task]] = {}
        instructions = 0
        for name in self.rebuilds:
            if name in self.reading:
                tasks, count = self._changed(name, batch, defer_update and name in self.updating)
            elif defer_update:  # the same for every batch: built once
                if name not in self._deferred:
                    self._deferred[name] = self._changed(name, self.compiled.code_batch, True)
                tasks, count = self._deferred[name]
            else:
                continue
            changed.update(tasks)
            instructions += count
        return BatchTasks(changed, instructions)

    def _changed(self, name: str, batch: Batch, defer_update: bool
                 ) -> tuple[dict[PE, list[Task]], int]:
        """Kernel `name`'s tasks for `batch` on the PEs where they differ from the compiled
        code, and the instructions of the tasks that differ."""
        linked = self.compiled.linked
        rebuild = self.rebuilds[name]
        new = self._build(name, rebuild.op, batch, defer_update)
        bindings = _bindings(new, rebuild)
        changed: dict[PE, list[Task]] = {}
        instructions = 0
        for pe, prog in new.programs.items():
            base = rebuild.tasks[pe]
            if prog.tasks == base:
                continue
            at = linked.kernel_pe(name, pe)
            compiled = linked.program.pes[at].tasks
            changed[at] = [
                compiled[i] if i < len(base) and task == base[i]
                else bound_task(task, bindings, f"kernel {name} PE {pe}", rebuild.switched)
                for i, task in enumerate(prog.tasks)]
            instructions += sum(len(task.instrs) for i, task in enumerate(changed[at])
                                if i >= len(compiled) or task is not compiled[i])
        return changed, instructions


@dataclass(frozen=True)
class BatchTasks:
    """The code of a batch: the whole task list of every PE whose code changes, and the
    number of instructions in the tasks that change."""

    tasks: dict[PE, list[Task]]
    instructions: int


def _bindings(kernel: Kernel, rebuild: _Rebuild) -> dict[int, int]:
    """The routed color of each symbolic stream id of `kernel`, a build of `rebuild`'s."""
    return dict(zip(_streams(kernel), rebuild.colors, strict=True))


def _streams(kernel: Kernel) -> list[int]:
    """A kernel's symbolic stream ids in declaration order: inputs, outputs, local."""
    return ([end.stream for end in kernel.inputs + kernel.outputs]
            + [local.stream for local in kernel.local_streams])


def _check_batch(batch: Batch, compiled: Compiled) -> None:
    vocab = compiled.cfg.model.vocab_size
    shape = compiled.code_batch.tokens.shape
    for name, ids in (("tokens", batch.tokens), ("targets", batch.targets)):
        if ids.shape != shape:
            raise ValueError(f"batch {name} of shape {ids.shape}, the program takes {shape}")
        if ids.size and not (0 <= int(np.min(ids)) and int(np.max(ids)) < vocab):
            raise ValueError(f"batch {name} outside 0..{vocab - 1}")


def _check_same_shape(old: Kernel, new: Kernel) -> None:
    """The rebuilt kernel streams and allocates exactly like the compiled one."""
    def ends(kernel: Kernel) -> list[tuple]:
        return ([(e.tensor, e.lane, e.cols, e.pes, e.order) for e in kernel.inputs]
                + [(e.tensor, e.lane, e.cols, e.pes, e.order) for e in kernel.outputs]
                + [(s.src, s.dsts) for s in kernel.local_streams])

    if ends(old) != ends(new) or old.allocations != new.allocations:
        raise AssertionError(f"kernel {old.name}: the code for a new batch streams or "
                             f"allocates differently from the compiled code")
