"""The export formats and their file suffixes: read by ppo-export's arguments without importing torch."""

FORMATS = ("onnx", "torchscript")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
