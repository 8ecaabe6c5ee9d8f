"""Inference engines: one module per engine, each found through the `edgeq.runtimes` registry."""
