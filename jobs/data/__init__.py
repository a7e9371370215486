"""Data preparation with Ray Data: inputs, the shared two-pass row machinery, text,
images and the FID reference; `prepare.prepare_data` is the entry point."""
