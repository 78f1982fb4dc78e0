"""The vipgate host: terminal sessions, authorisation against the points ledger, the CLI."""
