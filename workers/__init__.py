"""Process entry points built on the library: the `imgpipe` command and the `serve` daemon."""
