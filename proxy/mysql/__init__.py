"""MySQL listener: keyless answers the app's login itself and logs in upstream with a token."""
