"""Serving: the bundled Triton server, the exported model repository and the client."""
