"""GGUF for llama.cpp: the light spec (`spec`), the writer (`convert`), its tensor layout, quantization, vocabulary,
adapter files, ggml block math and the llama.cpp binding glue. Importing this package imports nothing heavy."""

# The modules llama.cpp's engine (edgeq.runtimes.llamacpp) reads too: the binding with its logs routed, and
# ggml's type table. An engine imports these and nothing else of the format (tests/test_layering.py).
SHARED_WITH_ENGINES = ("native", "ggml_quants")
