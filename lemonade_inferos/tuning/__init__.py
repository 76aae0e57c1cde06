"""Tuning a running server: workloads (recorded or from the report's prompt sets), A/B trials, the auto-tuner."""
