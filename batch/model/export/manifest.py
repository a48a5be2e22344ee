"""The marker of a complete `vlbatch export` folder: the manifest's file name and format tag.

Kept apart from the exporter so that reading an export never imports `onnx` (not installed on NPU boards).
"""

MANIFEST = "manifest.json"
FORMAT = "vlbatch-onnx"
FORMAT_VERSION = 2
# format 2: the decoder layers and the post graph take a leading rows dimension (several answers per decode step);
# format 1 exports still load and decode one answer at a time
FIRST_ROWS_VERSION = 2
MAX_ROWS = 64  # the most answers one decode step of such an export carries (the bound of model.batch)
