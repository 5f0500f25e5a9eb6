"""Object-store retries: every S3 filesystem the pipelines open retries failed requests with backoff.

Object stores fail a small fraction of requests (500 InternalError, 503 SlowDown, dropped connections), more
under load; one such failure must not turn a clip into an error row or break a shard commit. Two layers:

- botocore retries each request (``retries={"total_max_attempts": N, "mode": "standard"}``; N counts the
  first attempt, unlike botocore's ``max_attempts``, which counts retries only): 500/502/503/504,
  throttling codes and connection errors, with exponential backoff and full jitter: the i-th retry waits a
  random fraction of 2^i s, at most 20 s (measured on botocore 1.43 for 500s and 503s alike; botocore's newer
  formula, behind ``AWS_NEW_RETRIES_2026=true``, waits differently per error class);
- s3fs retries a whole call ``s3fs_retries`` times (its own backoff, 0.1 s x 1.7^i) on the errors botocore
  hands back, e.g. a connection that drops while a body is read.

`configure_s3_retries` installs the first as fsspec's default for the ``s3`` protocol
(``fsspec.config.conf``), so it reaches every ``s3://`` URI opened with no explicit ``config_kwargs``
(explicit storage options win), and the second as ``s3fs.S3FileSystem.retries`` (a class attribute in
s3fs, not a constructor argument). `pipelines/__init__.py` calls it, so every process that runs pipeline code (the driver and
each Ray worker, which imports the stage classes) has it. Environment overrides: ``GEN1_S3_MAX_ATTEMPTS``,
``GEN1_S3_RETRY_MODE``, ``GEN1_S3FS_RETRIES``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

RETRY_MODES = ("standard", "adaptive", "legacy")


@dataclass(frozen=True)
class S3RetryConfig:
    max_attempts: int = 8  # per request, the first included: at 20% failures 0.2^8 ~ 3e-6 of requests fail
    mode: str = "standard"  # botocore's: exponential backoff with jitter; 'adaptive' adds client rate limiting
    s3fs_retries: int = 5  # s3fs's own retries of a call (its default)

    def __post_init__(self) -> None:
        if self.mode not in RETRY_MODES:
            raise ValueError(f"S3 retry mode: expected one of {RETRY_MODES}, found {self.mode!r}")
        for name in ("max_attempts", "s3fs_retries"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"S3 {name}: expected an integer >= 1, found {getattr(self, name)!r}")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3RetryConfig:
        env = os.environ if env is None else env
        default = cls()
        try:
            return cls(
                max_attempts=int(env.get("GEN1_S3_MAX_ATTEMPTS", default.max_attempts)),
                mode=env.get("GEN1_S3_RETRY_MODE", default.mode),
                s3fs_retries=int(env.get("GEN1_S3FS_RETRIES", default.s3fs_retries)),
            )
        except ValueError as e:
            raise ValueError(f"GEN1_S3_MAX_ATTEMPTS / GEN1_S3FS_RETRIES: expected integers >= 1; {e}") from e

    def config_kwargs(self) -> dict[str, Any]:
        """S3FileSystem's ``config_kwargs`` (botocore client config)."""
        return {"retries": {"total_max_attempts": int(self.max_attempts), "mode": self.mode}}


def configure_s3_retries(cfg: S3RetryConfig | None = None) -> S3RetryConfig:
    """Make ``cfg`` (default: `S3RetryConfig.from_env`) the retry policy of ``s3://`` filesystems; keeps
    other s3 defaults a user set in fsspec's config (``FSSPEC_S3`` etc.), and a ``retries`` entry of theirs."""
    import fsspec.config

    cfg = cfg or S3RetryConfig.from_env()
    conf = fsspec.config.conf.setdefault("s3", {})
    config_kwargs = dict(conf.get("config_kwargs") or {})
    # total_max_attempts: botocore reads it as is (a max_attempts entry it rewrites in place, in this shared dict)
    config_kwargs.setdefault("retries", cfg.config_kwargs()["retries"])
    conf["config_kwargs"] = config_kwargs
    try:
        import s3fs
    except ImportError:  # the [s3] extra is not installed: no s3:// URIs to retry
        return cfg
    s3fs.S3FileSystem.retries = int(cfg.s3fs_retries)
    log.debug("s3 defaults: %s; s3fs retries %d", conf, s3fs.S3FileSystem.retries)
    return cfg
