"""Launch: the root command and the demo, torchrun / Slurm / nemo-run launchers, and the
NeMo 2 and Megatron-LM renderers (what starts processes or renders another framework's config)."""
