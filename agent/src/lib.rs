//! Worker-side agent: engine KV events, engine metrics, GPU telemetry, published to NATS. Not built yet: this crate is a compiling placeholder until its issue lands.
