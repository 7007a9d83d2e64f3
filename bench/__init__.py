"""Benchmarks of apiproxy. `python -m bench.run` compares the proxy with nginx and a direct path."""
