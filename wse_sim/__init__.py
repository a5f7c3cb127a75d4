"""wse_sim: a cycle-level simulator of a wafer-scale engine's PE mesh.

It runs any `wse_sim.program.Program`; it knows nothing of GPT (that is `compiler`).
"""

__version__ = "0.1.0"
