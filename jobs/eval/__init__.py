"""Evaluation of trained models (FID for image models)."""
