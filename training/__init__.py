"""Training: the OSDiff objective (objective.py), its loop and checkpoints (loop.py), and the
recipe of the built-in demo model (builtin.py) with its data (data.py) and evaluation
(evaluate.py)."""
