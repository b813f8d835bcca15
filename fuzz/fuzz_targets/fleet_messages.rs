//! What the control plane reads from NATS: KV event batches, heartbeats and load reports from
//! agents, decoded and applied to one fleet state in sequence.
#![no_main]

use std::collections::BTreeMap;
use std::time::Instant;

use kvmesh_control_plane::fleet_state::{FleetState, Settings};
use kvmesh_control_plane::ingest::apply_message;
use kvmesh_control_plane::wire::SubjectKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut fleet = FleetState::new(Settings::default(), BTreeMap::new());
    let now = Instant::now();
    // Messages separated by 0xfe 0xfe; each message's first byte picks its subject.
    let mut rest = data;
    while !rest.is_empty() {
        let end = rest.windows(2).position(|w| w == [0xfe, 0xfe]).unwrap_or(rest.len());
        let (message, tail) = rest.split_at(end);
        rest = tail.get(2..).unwrap_or(&[]);
        let Some((&first, payload)) = message.split_first() else { continue };
        let kind = match first % 3 {
            0 => SubjectKind::Kv,
            1 => SubjectKind::Worker,
            _ => SubjectKind::Load,
        };
        let _ = apply_message(&mut fleet, kind, payload, now);
    }
});
