"""nsfaas gateway: HTTP API, routing, storage and the CLI."""
