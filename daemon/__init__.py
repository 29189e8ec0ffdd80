"""The per-node ``ckptd`` sidecar: shared-memory snapshots, erasure coding, persistence."""
