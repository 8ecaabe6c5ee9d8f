"""Core ML: the light spec (`spec`), the converter (`convert`), shared int codes, the multifunction package merge,
reading a written package (`package`, which the engine reads too) and adapter functions. Importing this package
imports nothing heavy."""
