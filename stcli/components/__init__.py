"""Components: what a recipe names and the code that builds and uses them.

Registry entries chosen by ``name:`` in a recipe (SDEs, truncations, targets, nets, samplers,
data sets, metrics, loggers), the loss, the likelihood, the recipe schema and the model
rebuilt from a checkpoint.  A component imports other components and `stcli.infra`, never a
job.  Nothing here is imported eagerly.
"""
