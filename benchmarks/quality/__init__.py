"""The quality tables on MovieLens-100k (see this folder's README); run as ``python -m benchmarks.quality.<script>``."""
