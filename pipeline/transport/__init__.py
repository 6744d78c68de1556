"""The Redis job transport, all in one place.

- `connection`: clients with credentials and TLS, outages ridden out with backoff
  (the cache's Redis tier connects through it too);
- `contract`: the wire contract, job fields in and result fields out;
- `shards`: which shard a job goes to, and each shard's key names;
- `consumer`: jobs read through a consumer group, claimed, dead-lettered;
- `publisher`: each result and its job's acknowledgement in one MULTI;
- `sharded`: one daemon serving several shards, each on threads of its own;
- `client`: the other side, for submitting jobs and reading results, with
  `follow` (a result stream read across shards) and `dead_letters` (one
  shard's dead letters) under it.
"""
