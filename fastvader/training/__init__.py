"""The training loop and the pieces it strings together: sampling with truncated backprop
(sampling), which frames the reward sees (frames), prompt sources and the embedding cache
(prompts), per-video random streams (draws), and the Trainer (trainer)."""
