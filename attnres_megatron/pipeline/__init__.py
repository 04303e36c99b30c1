"""Pipeline parallelism for AttnRes: the pure stage layout, the stage I/O object (receive,
unpack, cache, ledger, send), payloads, the cross-stage cache, the byte ledger, schedules."""
