"""Checkpoint loading, the PyTorch stage modules, and ONNX export."""
