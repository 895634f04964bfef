"""The GPU worker: arq settings, the job runner, GPU helpers and the pipelines."""
