"""osdiff-engine: a deployment-optimized inference engine for the OSDiff image codec."""

__version__ = "0.1.0"
