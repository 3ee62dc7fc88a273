"""FX passes over captured attention graphs: detect, fold, absorb, expand, shard, and the pass manager.

Each pass takes a ``torch.fx.GraphModule`` and returns one (or, for analyses, a record of what it found),
with no hidden global state.
"""
