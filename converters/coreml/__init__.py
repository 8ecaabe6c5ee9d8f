"""Core ML: the light spec (`spec`), the converter (`convert`), shared int codes, the multifunction package merge,
reading a written package (`package`, which the engine reads too) and adapter functions. Importing this package
imports nothing heavy."""

# What the Core ML engines read too: a written package's weights (`package`) and the adapter functions' LoRA
# modules and factors (`adapters`, which coreml-torch runs). Nothing else of the format (tests/test_layering.py).
SHARED_WITH_ENGINES = ("package", "adapters")
