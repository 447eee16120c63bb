"""The visual-preference check (see this folder's README); run as ``python -m benchmarks.visual.<script>``."""
