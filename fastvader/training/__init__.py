"""The training loop and the pieces it strings together: sampling with truncated backprop
(sampling), which frames the reward sees (frames), prompt sources and the embedding cache
(prompts), per-video random streams (draws), sample -> decode -> reward (rollout), the one
Accelerator and gradient averaging over ranks (distributed), the run folder and resuming
(run_folder), Ctrl-C and SIGTERM (interrupt), and the Trainer (trainer)."""
