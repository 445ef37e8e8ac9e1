"""AMQP 1.0 for Service Bus and Event Hubs: the app's SAS put-tokens become Entra tokens.

codec.py (types, frames, performatives, sections), cbs.py (the put-token and the local
endpoint's address rewrites), stream.py (one connection's conversion, both directions),
session.py (the listener's serve).
"""
