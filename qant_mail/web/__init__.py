"""The web side: HTTP only; parse, call the application layer, answer."""
