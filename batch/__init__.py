"""vlbatch: batch captions and answers for media folders with InternVL3 (NPU via axengine, CPU via onnxruntime)."""

__version__ = "0.1.0"
