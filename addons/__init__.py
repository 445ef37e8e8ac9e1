"""mitmproxy addons: thin glue from mitmproxy's hooks to keyless' core in `proxy/`."""
