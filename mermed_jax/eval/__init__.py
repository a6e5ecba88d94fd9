"""Downstream evaluation: encoders, features, probes, fine-tuning, metrics, sweeps and reports."""
