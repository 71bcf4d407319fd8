"""Export and import of rooms and sessions: a versioned, JSON-serialisable format."""
