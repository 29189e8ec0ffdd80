"""gRPC protocol of the ``ckptd`` daemon.

``ckptd/rpc/v1/daemon.proto`` is the contract; ``daemon_pb2.py``, ``daemon_pb2_grpc.py``
and their ``.pyi`` stubs are generated from it and checked in. :func:`regenerate` rebuilds
them with the pinned ``grpcio-tools`` / ``mypy-protobuf`` (``python -m ckptd.rpc`` does it
in place; ``tests/test_daemon_server.py`` does it into a temporary directory and checks that
nothing changed).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

PROTO_FILES: tuple[str, ...] = ("ckptd/rpc/v1/daemon.proto",)
"""Proto sources, relative to the directory that contains the ``ckptd`` package."""

GENERATED_SUFFIXES: tuple[str, ...] = ("_pb2.py", "_pb2_grpc.py", "_pb2.pyi", "_pb2_grpc.pyi")


def package_root() -> Path:
    """The directory that contains the ``ckptd`` package (the protoc include root)."""
    return Path(__file__).resolve().parents[2]


def generated_files(proto: str) -> list[str]:
    """Paths (relative to :func:`package_root`) of the files generated from ``proto``."""
    stem = proto[: -len(".proto")]
    return [stem + suffix for suffix in GENERATED_SUFFIXES]


def regenerate(out_dir: Path) -> list[Path]:
    """Run ``grpc_tools.protoc`` on :data:`PROTO_FILES` writing into ``out_dir``.

    Returns the generated files. Raises ``RuntimeError`` with protoc's message on failure,
    ``ImportError`` if ``grpcio-tools`` is not installed.
    """
    import grpc_tools  # noqa: F401  (fail early with ImportError when missing)

    plugin = _plugin_in_env("protoc-gen-mypy")
    grpc_plugin = _plugin_in_env("protoc-gen-mypy_grpc")
    if plugin is None or grpc_plugin is None:
        raise ImportError("mypy-protobuf (protoc-gen-mypy, protoc-gen-mypy_grpc) is not installed")
    root = package_root()
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "grpc_tools.protoc", f"-I{root}",
        f"--python_out={out_dir}", f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}", f"--mypy_grpc_out={out_dir}",
        f"--plugin=protoc-gen-mypy={plugin}", f"--plugin=protoc-gen-mypy_grpc={grpc_plugin}",
    ]
    proc = subprocess.run(
        [*cmd, *PROTO_FILES], cwd=root, capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        raise RuntimeError(f"protoc failed ({proc.returncode}): {proc.stderr.strip()}")
    return [out_dir / rel for proto in PROTO_FILES for rel in generated_files(proto)]


def _plugin_in_env(name: str) -> str | None:
    """The protoc plugin script installed beside this Python interpreter, if any."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else shutil.which(name)
