"""Downstream evaluation: encoders, their inputs, protocols (registered by name: linear probe, kNN,
fine-tuning), metrics, sweeps and reports."""
