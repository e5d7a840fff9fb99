"""One file per network family; each stage is an nn.Module whose state_dict keys are the
checkpoint's keys under a fixed prefix (see export/checkpoint.py)."""
