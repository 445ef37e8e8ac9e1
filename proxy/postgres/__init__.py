"""PostgreSQL listener: the app logs in without a password, keyless logs in upstream over TLS
with an Entra token as the password, then relays bytes (codec.py: wire messages; session.py:
one client connection; cancel.py: which upstream a CancelRequest belongs to)."""
