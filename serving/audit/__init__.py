"""Fairness audits of exported models: the spec checked (`checks`), inference in Ray Data
(`inference`, `scorers`), the figures with Fairlearn (`fairness`), the report (`report`);
`run.run_audit` is the entry point."""
