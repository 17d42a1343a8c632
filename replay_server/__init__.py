"""Prioritized replay: sum-tree, frame-deduplicated storage, sampling, snapshots."""
