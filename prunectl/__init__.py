"""prunectl: the command-line client of the Prune Service (httpx only; no torch)."""
