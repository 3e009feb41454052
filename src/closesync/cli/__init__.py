"""The `closesync` command line."""
