"""qant-mail: write, check, preview and send a structured newsletter by email."""

__version__ = "0.1.0"
