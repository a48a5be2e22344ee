"""The marker of a complete `vlbatch export` folder: the manifest's file name and format tag.

Kept apart from the exporter so that reading an export never imports `onnx` (not installed on NPU boards).
"""

MANIFEST = "manifest.json"
FORMAT = "vlbatch-onnx"
FORMAT_VERSION = 1
