"""Load benchmarks for hitl against two baseline servers (see bench/README.md)."""
