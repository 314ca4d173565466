"""Dev-only helpers, apart from the daemon's own code: the embedded stack and the tiny model."""
