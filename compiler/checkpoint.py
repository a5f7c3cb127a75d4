"""A training run's checkpoint: everything `train --resume` needs to continue bit for bit,
and `generate` needs to load the weights.

Contents: the run config (as validated, so a resume can refuse another model, optimizer,
wafer or data), the data source, the number of steps done, the wafer's state after them
(`compiler.state.WaferState`: float32 weights, AdamW moments and step count, exactly as
they were in SRAM), the float64 reference run trained alongside (its weights and optimizer
state, float64), and the run's history (named columns of per-step and per-validation
figures; what they are is the training loop's business).

File: one .npz of arrays (no pickle) with a JSON header: `wafer/<tensor>`,
`float64/param/<P>`, `float64/m/<P>`, `float64/v/<P>`, `history/<column>`. `write` puts it
in an open binary file (the caller writes it atomically); `load_checkpoint` reads it, and
turns a file that is not one into a one-line UserError naming it.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from compiler.optim import OptimizerState
from compiler.state import WaferState
from wse_sim.errors import UserError

Arrays = dict[str, np.ndarray]
FORMAT = "wse_sim.checkpoint"
VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    config: dict[str, Any]  # RunConfig.model_dump(mode="json")
    data: dict[str, Any]  # where the text came from and how it was tokenized
    wafer: WaferState
    float64_params: Arrays
    float64_state: OptimizerState
    history: Arrays

    @property
    def step(self) -> int:
        """Training steps done."""
        return self.wafer.step

    def write(self, fh: BinaryIO) -> None:
        """The checkpoint as an .npz into `fh`."""
        header = {"format": FORMAT, "version": VERSION, "config": self.config,
                  "data": self.data, "step": self.step,
                  "float64_step": self.float64_state.step}
        arrays = {"header": np.frombuffer(json.dumps(header).encode(), np.uint8)}
        arrays.update({f"wafer/{name}": value for name, value in self.wafer.tensors.items()})
        arrays.update({f"float64/param/{p}": v for p, v in self.float64_params.items()})
        arrays.update({f"float64/m/{p}": v for p, v in self.float64_state.m.items()})
        arrays.update({f"float64/v/{p}": v for p, v in self.float64_state.v.items()})
        arrays.update({f"history/{name}": value for name, value in self.history.items()})
        np.savez(fh, **arrays)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """The checkpoint in `path`; a UserError naming the file if it is not one."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
        header = json.loads(arrays.pop("header").tobytes().decode())
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise ValueError(f"format {header.get('format')!r} version "
                             f"{header.get('version')!r}")
        groups: dict[str, Arrays] = {}
        for name, value in arrays.items():
            group, _, key = name.rpartition("/")
            groups.setdefault(group, {})[key] = value
        state = OptimizerState(step=int(header["float64_step"]),
                               m=groups.get("float64/m", {}), v=groups.get("float64/v", {}))
        return Checkpoint(header["config"], header["data"],
                          WaferState(int(header["step"]), groups.get("wafer", {})),
                          groups.get("float64/param", {}), state, groups.get("history", {}))
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, zipfile.BadZipFile,
            EOFError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path}: not a training checkpoint of format version {VERSION} "
                        f"({detail})") from None
