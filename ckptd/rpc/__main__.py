"""``python -m ckptd.rpc``: regenerate the checked-in gRPC code in place."""

from __future__ import annotations

from ckptd.rpc import package_root, regenerate

if __name__ == "__main__":
    for path in regenerate(package_root()):
        print(path)
