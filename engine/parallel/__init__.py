"""Tensor parallelism: head/intermediate partition, weight sharding, Ray worker actors, converted shards."""
