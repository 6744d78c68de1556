"""The Redis job transport, all in one place.

- `connection`: clients with credentials and TLS, outages ridden out with backoff
  (the cache's Redis tier connects through it too);
- `contract`: the wire contract, job fields in and result fields out;
- `consumer`: jobs read through a consumer group, claimed, dead-lettered;
- `publisher`: each result and its job's acknowledgement in one MULTI;
- `client`: the other side, for submitting jobs and reading results.
"""
