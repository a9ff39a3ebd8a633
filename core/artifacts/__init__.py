"""What a run writes: the checkpoint in every format, the report, digests."""
