"""The run: the block loop, the pipeline of a job, resume, sweeps, recovery."""
