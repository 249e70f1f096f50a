"""The `rlft` command (main.py: run, eval, export, sample, plan), and what only the command needs:
config validation before a run starts (validate.py), the per-run-directory lock (run_lock.py),
`rlft sample` (sample.py) and `rlft plan` (plan.py, which compiles train steps)."""
