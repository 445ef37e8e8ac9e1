"""MySQL: codec, the real MariaDB and fake Azure peers, and keyless between app and server."""
