"""Export of a Hugging Face InternVL folder to the ONNX layout that mirrors the NPU files."""
