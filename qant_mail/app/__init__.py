"""The application layer: every use case."""
