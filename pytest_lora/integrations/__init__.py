"""Optional integrations: Hypothesis (entry point and strategies), MLflow, matplotlib plots."""
