"""Monthly clearing: the settlement file, statements and the auditors' reconciliation pack."""
