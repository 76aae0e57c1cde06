"""The embedded controller: policy, configuration, measurements, quality guard and the control API."""
