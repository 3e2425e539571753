"""robust strategies (filled in by the robust issue)."""
