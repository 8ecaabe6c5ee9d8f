"""Format converters: one module per format, each found through the `edgeq.converters` registry."""
