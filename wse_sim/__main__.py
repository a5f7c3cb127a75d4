"""`python -m wse_sim`: the command line (wse_sim.cli) as a process."""

import os
import sys


def _leave(code: int) -> None:
    """Exit with `code` after a Ctrl-C, skipping the interpreter's finalization: CPython
    kills itself with SIGINT there (exit status -2, not 130) whenever a KeyboardInterrupt
    has crossed one of its PyRun_* calls, as in an extension built with pyo3, even if it
    was caught later. (A shell shows both as 130; a caller of the process sees the
    difference.) What is printed is flushed first."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a closed stdout
            pass
    os._exit(code)


try:
    from wse_sim.cli import INTERRUPTED, main
except KeyboardInterrupt:  # Ctrl-C while Python loads the command line
    print("interrupted: no file written", file=sys.stderr)
    _leave(130)  # wse_sim.cli.INTERRUPTED

code = main()
if code == INTERRUPTED:
    _leave(code)
sys.exit(code)
