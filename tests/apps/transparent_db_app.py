"""A legacy database/cache app for the transparent-mode tests: it connects straight to the
Azure server name with a WRONG password, TLS verified against the CA file it is given (keyless'
CA once iptables redirects it), and knows nothing of keyless. Prints one JSON line.

    python transparent_db_app.py postgres|mysql|redis HOST USER CA_FILE
"""

from __future__ import annotations

import json
import os
import sys

WRONG_PASSWORD = "the-old-password-that-no-longer-works"


def postgres(host: str, user: str, ca: str) -> dict[str, object]:
    import psycopg

    # CA "none": TLS without verification (an app that trusts whatever it is shown)
    verify = {"sslmode": "require"} if ca == "none" else {"sslmode": "verify-full",
                                                          "sslrootcert": ca}
    with psycopg.connect(host=host, port=5432, user=user, password=WRONG_PASSWORD,
                         dbname=user, **verify,
                         connect_timeout=20) as db:
        row = db.execute("SELECT current_user, ssl FROM pg_stat_ssl "
                         "WHERE pid = pg_backend_pid()").fetchone()
        db.execute("CREATE TABLE IF NOT EXISTS seen (n int)")
        db.execute("INSERT INTO seen SELECT generate_series(1, 100)")
        count = db.execute("SELECT count(*) FROM seen").fetchone()
    return {"user": row[0], "server_ssl": row[1], "rows": count[0]}


def mysql(host: str, user: str, ca: str) -> dict[str, object]:
    import pymysql

    db = pymysql.connect(host=host, port=3306, user=user, password=WRONG_PASSWORD,
                         ssl_ca=ca, ssl_verify_identity=True, ssl_verify_cert=True,
                         connect_timeout=20)
    try:
        with db.cursor() as cursor:
            cursor.execute("SELECT CURRENT_USER()")
            current = cursor.fetchone()[0]
            cursor.execute("SHOW STATUS LIKE 'Ssl_cipher'")
            cipher = cursor.fetchone()[1]
    finally:
        db.close()
    return {"user": current, "server_ssl": bool(cipher)}


def redis_app(host: str, user: str, ca: str) -> dict[str, object]:
    import redis

    client = redis.Redis(host=host, port=6380, password=WRONG_PASSWORD, ssl=True,
                         ssl_ca_certs=ca, socket_timeout=20)
    try:
        client.set("transparent", "yes")
        value = client.get("transparent")
        whoami = client.execute_command("ACL", "WHOAMI")
    finally:
        client.close()
    return {"user": whoami.decode(), "value": value.decode()}


def main() -> int:
    protocol, host, user, ca = sys.argv[1:5]
    run = {"postgres": postgres, "mysql": mysql, "redis": redis_app}[protocol]
    try:
        result: dict[str, object] = {"outcome": "ok", **run(host, user, ca)}
    except Exception as exc:  # the test reads the outcome; the message helps when it fails
        result = {"outcome": "refused", "error": f"{type(exc).__name__}: {exc}"[:500]}
    result["uid"] = os.getuid()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
