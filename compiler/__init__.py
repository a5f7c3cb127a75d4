"""compiler: lowers a GPT training step (config -> graph -> kernels -> placement -> routes)
into a `wse_sim.program.Program`. It knows nothing of numba."""
