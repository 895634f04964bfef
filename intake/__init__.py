"""The front doors: the drop folder (and, later, HTTP and chat)."""
