"""The worker plane: the `ias` command, the worker daemon and its job handlers."""

__version__ = "0.1.0"
