"""fedins strategies (filled in by the fedins issue)."""
