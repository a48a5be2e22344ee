"""Runtimes that execute the exported graphs: onnxruntime on any CPU, axengine on the Axera NPU."""
