"""Serving the codec on NVIDIA Triton Inference Server.

    models.py       the two models (osdiff_compress, osdiff_decompress): names, I/O, request handling
    server.py       `osdiff serve`: Triton in one command, through PyTriton
    proxy_model.py  the Python-backend model of `osdiff serve` (PyTriton's, with our error responses)
    fleet.py        `osdiff fleet`: replicas of `osdiff serve` behind HAProxy on one machine
    repository.py   `osdiff triton-repo`: a model repository for standalone tritonservers
    codec_model.py  the repository's codec models: a Codec over a backend that calls graph models (BLS)
    graph_model.py  the repository's ONNX graph models on the Python backend (--python-only)
    client.py       a small tritonclient wrapper (HTTP or gRPC) for the two models
"""
