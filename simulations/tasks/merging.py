"""Client tasks of the merging family."""
