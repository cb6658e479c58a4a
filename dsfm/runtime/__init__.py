"""Running a job: process groups, DeepSpeed engine, checkpoints and cluster launch helpers."""
