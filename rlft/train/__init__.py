"""Training: the pure SFT / reward / DPO steps and their shared update (steps.py), one resumable
stage (stages.py), the plain loop (loop.py), Orbax checkpoints (checkpoints.py), metrics
(logging.py) and warm starts from trained weights (warm_start.py)."""
