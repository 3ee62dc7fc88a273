"""Serving GQLA checkpoints in vLLM: a plugin (``plugin.register``, the ``vllm.general_plugins`` entry point),
the vLLM models it registers and the correction of vLLM's CPU rotary op (``rope``).

Importing this package imports neither vLLM nor its models: ``plugin`` and ``rope`` import vLLM only inside
their functions, which vLLM calls in each of its processes; the models (``models``, ``attention``) import vLLM
at module level and are loaded by vLLM's registry by name, only when a checkpoint asks for them.
"""
