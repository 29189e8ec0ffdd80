"""ckptd.formats: the on-disk format, the storage layer, the commit protocol, retention."""
