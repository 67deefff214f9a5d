"""Lotka-Volterra data, LLMTIME encoding and tokenized datasets."""
