"""The training layer: losses, the few-shot training loop, held-out selection, one experiment
cell (train -> select -> evaluate)."""
