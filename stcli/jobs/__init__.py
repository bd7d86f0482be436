"""Jobs: one module per command (and `api`, the same jobs as Python functions).

A job reads a recipe or a checkpoint and writes a result; it may import components
(`stcli.components`) and infrastructure (`stcli.infra`), and other jobs without a cycle.
Nothing here is imported eagerly, so that ``import stcli`` and ``st --help`` stay fast.
"""
