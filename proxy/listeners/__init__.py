"""Local listeners for protocols other than HTTP: PostgreSQL, MySQL and Redis.

One listener per server (as cloud-sql-proxy has one per instance): the app connects to it with
any password; keyless logs in upstream over verified TLS with an Entra token instead. The
protocol's own code lives in `proxy/<protocol>/` (codec and session); this package holds
what they share: the listener specs (`spec`), the per-connection record (`connection`), the
upstream dialling (`upstream`), the byte relay (`relay`) and the servers (`server`).
"""
