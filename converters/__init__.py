"""Reshard-spec language and checkpoint converters (``ckpt-convert``)."""
