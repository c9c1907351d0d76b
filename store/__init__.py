"""LMDB object store for paged KV snapshots (format ``paged-batchinvariant-v1``)."""
