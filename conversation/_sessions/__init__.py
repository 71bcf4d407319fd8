"""Per-user chat sessions with idle expiry (SPEC §4.19): ``store.SessionStore``."""
