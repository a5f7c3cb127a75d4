"""What a training step leaves in SRAM for the next one, and the program of the next step.

State. The tensors a step carries to the next are the parameters and, for AdamW, the two
moments and the per-PE step count (`compiler.ops.update.state_names`), named as after a
step (`updated:P`, ...). Updates are in place, so those words hold the same tensors before
the next step: the state is read out of one step's final SRAM and written, unchanged and
bit for bit, into the next step's initial SRAM.

Next step (`step_pes`). The compiled program with
* the state written into its SRAM image (weights and optimizer state stay in SRAM), and
* the batch-dependent code replaced (`compiler.batch`);
every other word starts as compiled: gradient accumulators and scratch at zero, the
kernels' constants in place. (On the hardware a kernel zeroes its accumulators when it
starts, a few cycles per word; here the image does it, untimed.) Placement, routes and
every other PE's code are those of the one compiled program.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from compiler.graph import TrainingGraph, updated_name
from compiler.ops.update import STEP_TENSOR, moment_names, state_names
from compiler.optim import OptimizerState
from wse_sim.program import PEProgram, Program, Task, initial_sram, read_tensor, write_tensor

Arrays = dict[str, np.ndarray]
PE = tuple[int, int]


@dataclass(frozen=True)
class WaferState:
    """The state tensors as the wafer holds them (float32, by their names after a step)
    after `step` steps."""

    step: int
    tensors: Arrays

    def params(self, graph: TrainingGraph) -> Arrays:
        """The graph's parameters in float64 (exactly the wafer's float32 values), in the
        graph's shapes."""
        return {p: self._value(updated_name(p), graph.tensors[p].shape)
                for p in graph.parameters}

    def optimizer(self, graph: TrainingGraph) -> OptimizerState:
        """The optimizer state in float64 (SGD keeps none but the step count)."""
        step_name = updated_name(STEP_TENSOR)
        if step_name not in self.tensors:
            return OptimizerState(step=self.step)
        moments = [{p: self._value(updated_name(moment_names(p)[k]), graph.tensors[p].shape)
                    for p in graph.parameters} for k in (0, 1)]
        return OptimizerState(step=int(self.tensors[step_name][0, 0]), m=moments[0],
                              v=moments[1])

    def _value(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        return self.tensors[name].astype(np.float64).reshape(shape)


def initial_state(program: Program, names: list[str]) -> WaferState:
    """The state tensors `names` in the compiled program's SRAM image: step 0."""
    images = {pe: initial_sram(prog) for pe, prog in program.pes.items()}
    return read_state(program, lambda x, y: images[(x, y)], names, 0)


def read_state(program: Program, sram: Callable[[int, int], np.ndarray], names: list[str],
               step: int) -> WaferState:
    """The state tensors `names` in SRAM words `sram(x, y)` after `step` steps (a
    training step's: `training_state`)."""
    return WaferState(step, {name: read_tensor(program.tensors[name], sram, name)
                             for name in names})


def training_state(program: Program, parameters: list[str]) -> list[str]:
    """The names of a training step's state tensors in `program`."""
    return state_names(program.tensors, parameters)


def step_pes(program: Program, state: WaferState, tasks: dict[PE, list[Task]]
             ) -> dict[PE, PEProgram]:
    """The programs of the PEs that differ from `program`'s in the step that starts from
    `state` with the tasks `tasks` (by PE) in place of the compiled ones (module docstring):
    the PEs that hold state (a new SRAM image) and those whose code changes. A PE whose code
    does not change keeps its task list, the same list, so the engine validates and
    assembles again only the code that changed (`wse_sim.engine.Loaded`). `program` itself
    is not changed."""
    images: dict[PE, np.ndarray] = {}

    def words(x: int, y: int) -> np.ndarray:
        if (x, y) not in images:
            images[(x, y)] = initial_sram(program.pes[(x, y)])
        return images[(x, y)]

    for name, value in state.tensors.items():
        write_tensor(program.tensors[name], value, words)
    pes = {}
    for pe in images.keys() | tasks.keys():
        old = program.pes[pe]
        pes[pe] = PEProgram(old.sram_words, tasks.get(pe, old.tasks),
                            {0: images[pe]} if pe in images else old.image)
    return pes
