"""TensorRT engines: building them from an ONNX export (build.py, after prepare.py and
profiles.py), the engine directory and its checks (manifest.py), and comparing them with ONNX
Runtime (compare.py). The runtime side is runtime/backends/tensorrt_backend.py. TensorRT itself is
an optional extra that needs a GPU (environment.py)."""
