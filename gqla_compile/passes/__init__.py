"""FX passes over captured attention graphs: detect, split, shard, absorb, expand (with fold's weight
folding), and the pass manager that runs them and keeps their records.

Each pass takes a ``torch.fx.GraphModule`` and returns one (detect, an analysis, returns it unchanged and
fills its layer's context). Passes share only the graph and their layer's explicit
:class:`~gqla_compile.passes.context.LayerContext`; nothing layer-specific is stored on the graph, which
layers of one structure share.
"""
