"""Forecasting: grammar-constrained batched generation, metrics, baselines and plots."""
