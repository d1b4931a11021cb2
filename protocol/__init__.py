"""The wire between daemon and workers: message types and their msgpack encoding with limits."""
