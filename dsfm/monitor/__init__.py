"""Run monitoring: NVML/GPM GPU samplers, host samplers, step timers and TensorBoard dashboards."""
