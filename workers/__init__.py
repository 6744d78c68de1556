"""Long-running processes and threads: the preprocessing pool, the inference loop."""
