"""PyMongo's own test suite run against the embedded server, compared with a ledger."""
