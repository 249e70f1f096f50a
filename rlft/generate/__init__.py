"""Running trained models: token log-probabilities under a sampling distribution (logprobs.py),
the KV-cache sampler (sampling.py) and batched scoring of token sequences (scoring.py)."""
