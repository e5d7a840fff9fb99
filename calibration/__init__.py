"""Reduced-precision decisions: which ops stay fp32 in the fp16 graphs, and why."""
