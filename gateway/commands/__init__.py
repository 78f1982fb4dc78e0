"""The `vipgate` sub-commands, one module per group; each exposes `register(subparsers, common)`."""
