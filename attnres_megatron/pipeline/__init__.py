"""Pipeline parallelism for AttnRes: stage layouts, payloads, cross-stage cache, byte ledger."""
