"""Delivery: composing messages, signing them, carrying them, reading what comes back."""
