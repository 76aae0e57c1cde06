"""Measurements: InferenceStats per request, the recorder over time windows, the Prometheus collector."""
