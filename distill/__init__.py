"""Student models: training, calibration, thresholds, evaluation, registry and serving."""
