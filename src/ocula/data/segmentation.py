"""Dataset readers for the segmentation task (registered in ocula.data.registry)."""
