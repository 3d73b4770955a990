"""Runtime ops: torch.library custom ops that optimized graphs call (quantized.py), their ONNX translations, and Triton kernels (kernels/)."""
