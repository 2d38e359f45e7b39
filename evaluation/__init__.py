"""Evaluation of a trained model: perplexity, generation sanity and generation speed."""
