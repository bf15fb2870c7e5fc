"""The Ray execution backend, plugged in by name (``backend="ray"``) through ``runtime.backends``."""
