//! Control plane: NATS ingest, fleet index, state stream to filters, REST admin. Not built yet: this crate is a compiling placeholder until its issue lands.
