"""mermed-jax: MerMED-FM (MaSSL with modality gating) pretraining and evaluation in JAX/Flax."""
