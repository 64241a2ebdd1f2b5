"""Executing a plan: jobs, the worker pool that notices dead workers, partitions and merge, Ray, and
the pipeline that ties I/O to the kernels and finalizes the output."""
