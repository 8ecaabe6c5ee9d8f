"""GGUF for llama.cpp: the light spec (`spec`), the writer (`convert`), its tensor layout, quantization, vocabulary,
adapter files, ggml block math and the llama.cpp binding glue. Importing this package imports nothing heavy."""
