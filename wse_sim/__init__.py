"""wse_sim: a cycle-level simulator of a wafer-scale engine's PE mesh, and the command line.

Layers (tests/test_layers.py enforces them):

* the simulator core, every module here but the CLI and the run pipeline: the Program IR
  (`program`), the hardware description (`hardware`), the engine (`engine`, `router`,
  `assemble`), its counters and reports (`stats`, `report`, `critical`, `plots`,
  `losscurve`),
  synthetic traffic
  (`traffic`), and the rules for what a user gives and gets: input files and config
  numbers (`userinput`), output files (`outputs`), host memory (`hostmem`). It runs any
  `wse_sim.program.Program` and knows nothing of GPT; it never imports `compiler`.
* `compiler` (beside this package) lowers a GPT training step to a Program using only the
  core's Program IR, hardware description, error types, user-input readers and
  host-memory estimates.
* the CLI (`cli`, `commands`), the run pipeline (`pipeline`) and the training step it
  runs micro-batch after micro-batch (`step`), sweeps of runs on dask.distributed
  (`sweep`) and the training loop (`train`) join the two.
"""

__version__ = "0.1.0"
