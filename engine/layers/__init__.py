"""Building blocks: linear (with shard-aware loaders), norm, rotary embedding, paged attention."""
