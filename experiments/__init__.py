"""The experiment grids behind docs/: one module per paper, dispatched by sweeps.py."""

