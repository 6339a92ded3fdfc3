"""The pipeline's work as plain functions; only `steps.py` and `artifacts.py` import Prefect."""
