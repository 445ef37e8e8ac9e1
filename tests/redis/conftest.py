"""Fixtures of the Redis listener tests: the e2e suite's PKI and identity endpoint."""

from tests.e2e.conftest import identity, module_identity, pki

__all__ = ["identity", "module_identity", "pki"]
