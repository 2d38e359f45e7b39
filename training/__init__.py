"""The Megatron-core trainer: model builder, parallel state, data, train loop, checkpoints.

Runs the same recipe on GPUs (NCCL, Transformer Engine) and, tiny, on CPU (gloo). Imports
`recipes` and `preprocessing` only; conversion and evaluation build their models through it.
"""
