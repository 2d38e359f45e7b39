"""Launch: the CLI, the Megatron-core trainer, torchrun / Slurm / nemo-run launchers and renderers."""
