"""Hyperparameter sweeps over training jobs with Ray Tune."""
