"""The progress line on a terminal: the compiler's records while it works (cleared at the
end), the simulated cycles after (kept); nothing when stderr is not a terminal."""

from __future__ import annotations

import io
import logging
import re
import sys

from wse_sim.progress import Progress

ROUTING = logging.getLogger("compiler.routing")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def on_terminal(monkeypatch) -> Terminal:
    """A terminal as stderr, set in the test itself (pytest's capture sets its own
    between a fixture and the test)."""
    stderr = Terminal()
    monkeypatch.setattr(sys, "stderr", stderr)
    return stderr


def test_a_compilers_record_is_drawn_then_cleared(monkeypatch):
    terminal = on_terminal(monkeypatch)
    with Progress(True):
        ROUTING.info("routing, negotiation: round %d", 7)
    assert re.fullmatch(r"\rrouting, negotiation: round 7 +\d+\.\d s\x1b\[K\r\x1b\[K",
                        terminal.getvalue())
    ROUTING.info("routing, negotiation: round %d", 8)  # the line's handler has gone
    assert "round 8" not in terminal.getvalue()


def test_records_in_quick_succession_are_drawn_ten_a_second(monkeypatch):
    terminal = on_terminal(monkeypatch)
    with Progress(True):
        for k in range(1, 4):
            ROUTING.info("routing, negotiation: round %d", k)
    assert "round 1 " in terminal.getvalue() and "round 2 " not in terminal.getvalue()


def test_the_simulations_line_follows_the_compilers_and_stays(monkeypatch):
    terminal = on_terminal(monkeypatch)
    with Progress(True) as progress:
        ROUTING.info("routing, colors shared in two phases: round 1")
        progress(25_000)
    assert re.fullmatch(r"\rrouting, colors shared in two phases: round 1 +\d+\.\d s\x1b\[K"
                        r"\rsimulating: +25,000 cycles .* k cycles/s\x1b\[K\n",
                        terminal.getvalue())


def test_the_engines_record_is_drawn_however_soon_after_routings(monkeypatch):
    # numba may compile the engine for a minute right after routing's last round
    terminal = on_terminal(monkeypatch)
    with Progress(True) as progress:
        ROUTING.info("routing, negotiation: round 3")
        logging.getLogger("wse_sim.engine").info("preparing the simulator engine")
        progress(10)
    assert re.search(r"round 3 .*\rpreparing the simulator engine +\d+\.\d s\x1b\[K"
                     r"\rsimulating", terminal.getvalue())


def test_nothing_is_drawn_off_a_terminal_or_when_quiet(monkeypatch):
    terminal = on_terminal(monkeypatch)
    with Progress(False) as progress:
        ROUTING.info("routing, negotiation: round 1")
        progress(100)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with Progress(True) as progress:
        ROUTING.info("routing, negotiation: round 1")
        progress(100)
    assert terminal.getvalue() == "" and sys.stderr.getvalue() == ""
