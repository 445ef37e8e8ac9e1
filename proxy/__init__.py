"""keyless: a sidecar proxy that swaps Azure key-based auth for managed-identity tokens."""

__version__ = "0.1.0"
