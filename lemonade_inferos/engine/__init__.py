"""The inference engine: model folders, sessions, the decode loop and its baseline."""
