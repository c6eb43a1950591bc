"""Running: config, devices, backends, the worker, the coordinator, resume and retry, SLURM, status, verify."""
