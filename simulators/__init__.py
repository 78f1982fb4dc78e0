"""POS terminal simulators: clients of the public protocol for rehearsals, load and replay."""
