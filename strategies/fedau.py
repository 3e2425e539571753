"""fedau strategies (filled in by the fedau issue)."""
