"""Sub-commands of ``gqla-compile``; see gqla_compile/cli.py."""
