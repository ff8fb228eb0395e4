"""The readers' side that is no SQL: signed tokens."""
