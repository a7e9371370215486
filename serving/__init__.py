"""Ray Serve deployments of exported models, behind the audit gate."""
