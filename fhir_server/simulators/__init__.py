"""Runnable upstream systems serving reproducible synthetic Chinese data (for demos, tests, benches)."""
