"""Training that fails loudly: numerical guards (guards), "did it learn?" signals
(learn_signals), the startup self-check (selfcheck) and reward-hacking safeguards (safeguards)."""
