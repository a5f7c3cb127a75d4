"""One module per CLI sub-command. Each exposes `NAME`, `HELP`, `add_arguments(parser)` and
`run(args) -> int`; `wse_sim.cli` collects the modules listed in COMMANDS."""

COMMANDS = ("run", "graph", "schema", "traffic", "plot")
