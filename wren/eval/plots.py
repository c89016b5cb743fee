"""Training curves as PNG images, drawn with matplotlib (the optional `report` extra)."""

from __future__ import annotations

import io

from wren.errors import WrenError
from wren.eval.run_dir import Curve


def curves_png(curves: dict[str, Curve], title: str, ylabel: str) -> bytes:
    """One chart of the given curves (label -> (step, value) pairs), as PNG bytes."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise WrenError(
            "the report's plots need matplotlib, which is not installed; "
            "install the report extra: pip install 'wrenlm[report]'"
        ) from None
    # A bare Figure draws with the Agg renderer and touches no global pyplot state or GUI backend.
    figure = Figure(figsize=(6.4, 3.6), dpi=100, layout="constrained")
    axes = figure.add_subplot()
    for label, curve in curves.items():
        steps, values = zip(*curve, strict=True)
        axes.plot(steps, values, label=label, marker="o" if len(curve) <= 20 else None, markersize=3)
    axes.set(title=title, xlabel="step", ylabel=ylabel)
    axes.grid(alpha=0.3)
    if len(curves) > 1:
        axes.legend()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
