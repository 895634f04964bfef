"""A job kind and a channel written outside reelqueue, each one module, registered by
``[plugins]`` in the config (tests/test_plugins.py)."""
