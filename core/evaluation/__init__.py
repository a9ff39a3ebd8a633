"""Evaluation: perplexity (whole or block by block), zero-shot tasks, the gate."""
