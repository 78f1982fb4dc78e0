"""One module per schema revision, oldest first; each says why the schema changed."""
