"""ONNX for onnxruntime: the light spec (`spec`), the graph writer (`convert`), block-quantized weights and adapter
files. Importing this package imports nothing heavy."""
