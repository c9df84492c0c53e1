"""Small, runnable examples of handlers written against the public API."""
