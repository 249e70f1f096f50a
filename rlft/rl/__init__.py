"""The RL path, in reading order: the `rl` config section and its per-algorithm defaults
(config.py), rewards (rewards.py), rollouts and experience (rollout.py), the policy-gradient
update (pg_step.py) and the resumable RL stage (stage.py). The losses, advantages and KL it
uses are pure functions in `rlft.objectives`."""
