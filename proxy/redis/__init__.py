"""The Redis listener: Azure Cache for Redis and Azure Managed Redis with Entra tokens.

`codec` is the wire protocol (pure); `session.serve` runs one client connection.
"""
