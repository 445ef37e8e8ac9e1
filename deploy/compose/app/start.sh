#!/bin/sh
# Deployment glue, not app code: requests' REQUESTS_CA_BUNDLE replaces certifi's bundle, so give
# it certifi's CAs plus keyless' CA, then start the unchanged app.
set -eu
cat "$(python -m certifi)" "${KEYLESS_CA:?}" > "${REQUESTS_CA_BUNDLE:?}"
exec python "$(dirname "$0")/app.py" "$@"
