"""Infrastructure: no knowledge of diffusion.

The `Registry` type, errors, console output, safetensors files and training state, run-folder
locks and atomic writes, process groups, seeded generators, ODE solvers, images and output
paths.  Infrastructure imports only infrastructure.  Nothing here is imported eagerly.
"""
