//! What Baton's tools share: `baton-load` and `baton-fanout` (BENCHMARKS.md) and `baton-fault`
//! (RELIABILITY.md), the binaries in `src/bin/`. They talk to a running server over HTTP,
//! websockets and AMQP as its users do, and never link the server itself.

pub mod common;
