"""The worker: its serving loop, the query path as one module per stage (intake, cache,
select, dispatch, join/merge, emit, offsets), and what it does when partitions move."""
