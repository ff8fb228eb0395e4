"""The base: errors, settings, schema, addresses and files, which every layer uses."""
