"""Backends, entropy coding, the .osd bitstream, the codec pipeline and profiling."""
