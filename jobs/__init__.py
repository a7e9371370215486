"""Data preparation, training, evaluation, export and sampling: the work Ray runs."""
