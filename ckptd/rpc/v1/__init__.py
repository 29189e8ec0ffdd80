"""Version 1 of the daemon protocol: ``daemon.proto`` and its generated code."""
