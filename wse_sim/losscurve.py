"""The loss curve of a training run: training loss per step and validation loss, the
wafer's and the float64 run's, against the step, as PNG bytes (drawn on a private Agg
figure, like `wse_sim.plots`)."""

from __future__ import annotations

import io
from collections.abc import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

SIZE_INCHES = (9.0, 5.0)
DPI = 100


def loss_curve_png(loss: Sequence[float], loss_float64: Sequence[float],
                   val_steps: Sequence[int], val_loss: Sequence[float],
                   val_loss_float64: Sequence[float], title: str) -> bytes:
    """Step s's training loss at x = s (the loss of the weights before its update), a
    validation loss at x = the number of steps done when it was measured."""
    fig = Figure(figsize=SIZE_INCHES, dpi=DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = range(len(loss))
    ax.plot(steps, loss, color="tab:blue", lw=0.8, alpha=0.6, label="train (wafer)")
    ax.plot(steps, loss_float64, color="tab:gray", lw=0.8, ls=":", label="train (float64 run)")
    ax.plot(val_steps, val_loss, color="tab:red", marker="o", ms=3, label="validation (wafer)")
    ax.plot(val_steps, val_loss_float64, color="black", ls="--", lw=0.8,
            label="validation (float64 run)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=DPI)
    return png.getvalue()
