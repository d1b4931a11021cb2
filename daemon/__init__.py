"""Nimbus daemon: HTTP API, scheduler, router, supervisor and the `nimbus` command line (never imports torch)."""
