"""Dataset readers for the detection task (registered in ocula.data.registry)."""
