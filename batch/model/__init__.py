"""Model folders: reading Hugging Face InternVL checkpoints as data, making small ones, exporting to ONNX."""
