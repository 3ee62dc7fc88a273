"""Serving GQLA in vLLM: a plugin loaded through the ``vllm.general_plugins`` entry point (importing this
package never imports vLLM)."""
