"""One module per CLI sub-command. Each exposes `HELP`, `add_arguments(parser)` and
`run(args) -> int`; `wse_sim.cli` collects the modules listed in COMMANDS."""

COMMANDS = ("run", "compile", "simulate", "graph", "schema", "traffic", "plot", "sweep")
