"""reelqueue's long-running side: configuration, the job model, the queue client,
embedded Redis, delivery of results, and the command-line entry points."""
