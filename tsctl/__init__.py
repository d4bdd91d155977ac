"""The `tsctl` command line: thin; parses, calls the packages, shows progress and tables."""

__version__ = "0.1.0"
