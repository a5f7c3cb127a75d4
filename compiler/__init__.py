"""compiler: lowers a GPT training step onto the wafer and checks it.

config (pydantic) -> gpt (the step's graph from the op families in `compiler.ops`) ->
lower (op -> kernel) -> placement -> orient -> routing (-> wse_sim.program.Program);
`reference` computes the same step in numpy and `check` compares. It uses only the
simulator's Program IR, hardware description and error types (never its engine).
"""
