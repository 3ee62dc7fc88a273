"""Serving GQLA checkpoints in vLLM: a plugin (``plugin.register``, the ``vllm.general_plugins`` entry point)
and the vLLM models it registers.

Importing this package imports neither vLLM nor its models: ``plugin`` imports vLLM only inside
``register()``, which vLLM calls in each of its processes; the models (``models``, ``attention``) import vLLM
at module level and are loaded by vLLM's registry by name, only when a checkpoint asks for them.
"""
