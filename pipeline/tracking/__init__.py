"""MLflow: the runs each stage logs, their comparison, and the UI."""
