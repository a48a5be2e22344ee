"""The marker of a complete `vlbatch export` folder: the manifest's file name and format tag.

Kept apart from the exporter so that reading an export never imports `onnx` (not installed on NPU boards).
"""

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "vlbatch-onnx"
FORMAT_VERSION = 3
# format 2: the decoder layers and the post graph take a leading rows dimension (several answers per decode step);
# format 1 exports still load and decode one answer at a time
FIRST_ROWS_VERSION = 2
# format 3: a head-major K/V history in the manifest's `kv_cache` dtype (fp16 unless exported with fp32), and the
# rotary tables as layer inputs; exports of formats 1 and 2 still load, with their float32 token-major history
FIRST_HEAD_MAJOR_VERSION = 3
MAX_ROWS = 64  # the most answers one decode step of such an export carries (the bound of model.batch)
# the K/V history's formats (`vlbatch export --kv-cache`, the manifest's `kv_cache`)
CACHE_DTYPES = {"fp16": np.float16, "fp32": np.float32}
