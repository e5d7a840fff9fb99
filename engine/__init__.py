"""TensorRT engine building (optional: needs the `tensorrt` extra and a GPU)."""
