"""Learning from feedback: the learner (one writer per selection key), the feed it reads in
batches, every worker's view of the selection states, and replay."""
