"""The multi-worker core: windows, writes, rooms, the loop they run on, and the
replicator that keeps each room's memory and Redis converging. No public names:
``ConversationManager`` (``conversation._manager``) is the face of it."""
