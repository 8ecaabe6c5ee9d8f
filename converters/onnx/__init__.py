"""ONNX for onnxruntime: the light spec (`spec`), the graph writer (`convert`), block-quantized weights and adapter
files. Importing this package imports nothing heavy."""

# onnxruntime's engine reads the bundle through onnxruntime alone (tests/test_layering.py).
SHARED_WITH_ENGINES = ()
