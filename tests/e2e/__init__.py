"""End-to-end tests: real Prefect server, workers and SeaweedFS (marker e2e)."""
