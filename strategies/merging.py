"""merging strategies (filled in by the merging issue)."""
