"""Everything that speaks to Redis: keys, scripts, the pipeliner, script replies,
the stores, and which failures are worth retrying. Imports nothing above it."""
