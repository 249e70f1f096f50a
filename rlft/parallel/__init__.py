"""Meshes and multi-process runs: logical-axis sharding rules (sharding.py) and start-up, process
roles, local rows and gathers (distributed.py). Depends on nothing in rlft but errors."""
