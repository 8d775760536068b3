"""Sweeps: many normal runs of one config with different overrides, and their analysis.

    spec.py          product / zip_ / chain, the size knob, IsoFLOP grids
    runner.py        `flaxllm sweep`: every point in its own workdir, resumable, N workers
    wandb_export.py  `flaxllm sweep --export-wandb=sweep.yaml` for `wandb sweep` / `wandb agent`
    fit.py           Chinchilla approach 3 (L(N, D) with Huber + L-BFGS + bootstrap) and 2
    plots.py         IsoFLOP curves, the fitted law against the points, N_opt against C
    main.py          the `flaxllm sweep` and `flaxllm scaling` commands
"""
from flaxllm.sweeps.spec import chain, isoflop, product, shape, shape_for_params, zip_

__all__ = ['chain', 'isoflop', 'product', 'shape', 'shape_for_params', 'zip_']
