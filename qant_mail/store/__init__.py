"""The store: the databases and every statement of SQL."""
