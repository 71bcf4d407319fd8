"""Reading a room's history as it changes: the change feed and its cursors."""
