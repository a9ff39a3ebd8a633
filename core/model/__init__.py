"""Model access: families, loading, caches, placement, weights on disk, block inputs."""
