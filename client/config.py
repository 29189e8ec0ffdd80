"""Client configuration: one frozen dataclass, set with :func:`ckpt.configure`.

Defaults suit one node with a local disk; environment variables ``CKPT_*`` override
them at import (validated, with clear messages).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any

from ckptd.chunking import DEFAULT_MIN_ALIGNED_CHUNK_BYTES, DEFAULT_TARGET_CHUNK_BYTES
from ckptd.errors import CkptError
from ckptd.formats.chunkcodec import CodecPolicy
from ckptd.formats.retention import RetentionPolicy
from ckptd.formats.writer import WriterOptions
from ckptd.planner import PlanOptions


class ConfigError(CkptError, ValueError):
    """A configuration value is invalid."""


@dataclass(frozen=True)
class Config:
    """Everything a save or load may tune."""

    staging_budget_bytes: int | None = None  # None: as large as one snapshot needs
    max_inflight_saves: int = 1  # saves staged but not yet durable, per rank
    writer: WriterOptions = field(default_factory=WriterOptions)
    read_workers: int = 4
    codec: CodecPolicy = field(default_factory=CodecPolicy)
    remote_codec: CodecPolicy = field(default_factory=lambda: CodecPolicy(min_ratio=1.05))
    plan: PlanOptions = field(
        default_factory=lambda: PlanOptions(
            DEFAULT_TARGET_CHUNK_BYTES, DEFAULT_MIN_ALIGNED_CHUNK_BYTES
        )
    )
    retention: RetentionPolicy | None = field(default_factory=lambda: RetentionPolicy(keep_last=3))
    collective_timeout_s: float = 600.0
    # The node's ckptd (unix socket); None: the in-process pipeline. CKPTD_SOCKET sets it.
    daemon_socket: str | None = None
    daemon_token: str | None = field(default=None, repr=False)  # CKPTD_JOB_TOKEN
    job_id: str | None = None  # names the job's snapshots; default derived from the root
    # What a save's wait() waits for through a daemon: "staged" (in the node's shared
    # memory), "protected" (erasure group holds parity), "committed" (in storage).
    daemon_wait: str = "committed"
    daemon_wait_timeout_s: float = 6 * 3600.0  # a save's wait() gives up after this
    # Load from the daemons' memory when they hold a step at least as new as storage's.
    load_from_memory: bool = True

    def __post_init__(self) -> None:
        if self.max_inflight_saves < 1:
            raise ConfigError(f"max_inflight_saves must be >= 1, got {self.max_inflight_saves}")
        if self.staging_budget_bytes is not None and self.staging_budget_bytes <= 0:
            raise ConfigError(f"staging_budget_bytes must be > 0, got {self.staging_budget_bytes}")
        if self.read_workers < 1:
            raise ConfigError(f"read_workers must be >= 1, got {self.read_workers}")
        if self.daemon_wait not in ("staged", "protected", "committed"):
            raise ConfigError(
                "daemon_wait must be 'staged', 'protected' or 'committed', "
                f"got {self.daemon_wait!r}"
            )

    def codec_for(self, root: str) -> CodecPolicy:
        """Remote storage is slower than compression; local disks are not (measured)."""
        local = "://" not in root or root.startswith("file://")
        return self.codec if local else self.remote_codec


_ENV_INT = {
    "CKPT_STAGING_BUDGET_BYTES": "staging_budget_bytes",
    "CKPT_MAX_INFLIGHT_SAVES": "max_inflight_saves",
    "CKPT_READ_WORKERS": "read_workers",
}


def from_env(base: Config | None = None, env: dict[str, str] | None = None) -> Config:
    """Apply ``CKPT_*`` environment overrides to ``base``."""
    env = dict(os.environ if env is None else env)
    cfg = base or Config()
    changes: dict[str, Any] = {}
    for var, attr in _ENV_INT.items():
        if var in env:
            try:
                changes[attr] = int(env[var])
            except ValueError:
                raise ConfigError(f"{var}={env[var]!r} is not an integer") from None
    if "CKPT_WRITE_WORKERS" in env:
        try:
            changes["writer"] = replace(cfg.writer, workers=int(env["CKPT_WRITE_WORKERS"]))
        except ValueError:
            raise ConfigError(
                f"CKPT_WRITE_WORKERS={env['CKPT_WRITE_WORKERS']!r} is not an integer"
            ) from None
    if env.get("CKPTD_SOCKET"):
        changes["daemon_socket"] = env["CKPTD_SOCKET"]
    if env.get("CKPTD_JOB_TOKEN"):
        changes["daemon_token"] = env["CKPTD_JOB_TOKEN"]
    if env.get("CKPT_JOB_ID"):
        changes["job_id"] = env["CKPT_JOB_ID"]
    if "CKPT_CODEC" in env:
        try:
            changes["codec"] = replace(cfg.codec, codec=env["CKPT_CODEC"])
        except ValueError as e:
            raise ConfigError(f"CKPT_CODEC: {e}") from None
    return replace(cfg, **changes)
