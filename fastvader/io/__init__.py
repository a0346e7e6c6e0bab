"""What a run reads and writes: atomic checkpoints (checkpoint), LoRA exports (export), videos,
grids and curves (media), and logging backends (loggers)."""
