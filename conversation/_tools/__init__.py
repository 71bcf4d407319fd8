"""Operator tooling: the CLI, the demo, the benchmark and private redis-server processes.

Nothing in the engine imports this package."""
