"""Training curves of one run: the loss beside the held-out selection curve (curves.png)."""

from __future__ import annotations

import io
from pathlib import Path


def held_out_gain(selection: dict | None):
    """(steps, held-out score minus the default prompts' score) of a selection record."""
    if not selection or not selection.get("curve"):
        return None
    return ([c["step"] for c in selection["curve"]],
            [c["score"] - selection["default_score"] for c in selection["curve"]])


def plot_train_curves(path: Path, log: list[dict], selection: dict | None) -> None:
    """``ssprompt train``: the loss curve beside the held-out selection curve."""
    import matplotlib

    from ..io import write_bytes

    fig = matplotlib.figure.Figure(figsize=(8, 3.2))
    ax1, ax2 = fig.subplots(1, 2)
    if log:
        ax1.plot([e["step"] for e in log], [e["loss"] for e in log])
    ax1.set(xlabel="step", ylabel="training loss", yscale="log", title="loss (fit shots)")
    gain = held_out_gain(selection)
    if gain is not None:
        ax2.plot(*gain, marker="o")
        ax2.axhline(0, color="k", lw=0.8, label="default prompts")
        selected = selection["selected"]
        if selected != "default":
            ax2.axvline(selected, color="g", ls="--", label=f"selected: step {selected}")
        ax2.legend(fontsize=7)
    ax2.set(xlabel="step", ylabel="score - defaults' score",
            title="held-out shots: mean of mIoU, AP50, PQ")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    write_bytes(path, buf.getvalue())
