//! Conversions between the wire enums and kvmesh-core's domain types, in one place for every crate
//! that reads or writes the schemas.

use kvmesh_core::{Engine, Role, WorkerState};

use crate::v1 as pb;

/// Engine of a wire value; unknown and unspecified values read as vLLM (the schema's most common).
pub fn engine_from_wire(value: i32) -> Engine {
    match pb::Engine::try_from(value) {
        Ok(pb::Engine::Sglang) => Engine::Sglang,
        Ok(pb::Engine::Trtllm) => Engine::Trtllm,
        _ => Engine::Vllm,
    }
}

/// Wire value of an engine.
pub fn engine_to_wire(engine: Engine) -> i32 {
    (match engine {
        Engine::Vllm => pb::Engine::Vllm,
        Engine::Sglang => pb::Engine::Sglang,
        Engine::Trtllm => pb::Engine::Trtllm,
    }) as i32
}

/// Role of a wire value; unspecified (and unknown) means both, as the schema says.
pub fn role_from_wire(value: i32) -> Role {
    match pb::Role::try_from(value) {
        Ok(pb::Role::Prefill) => Role::Prefill,
        Ok(pb::Role::Decode) => Role::Decode,
        _ => Role::Both,
    }
}

/// Wire value of a role.
pub fn role_to_wire(role: Role) -> i32 {
    (match role {
        Role::Prefill => pb::Role::Prefill,
        Role::Decode => pb::Role::Decode,
        Role::Both => pb::Role::Both,
    }) as i32
}

/// Worker state of a wire value; unspecified (and unknown) means ready, as the schema says.
pub fn state_from_wire(value: i32) -> WorkerState {
    match pb::WorkerState::try_from(value) {
        Ok(pb::WorkerState::Cordoned) => WorkerState::Cordoned,
        Ok(pb::WorkerState::Draining) => WorkerState::Draining,
        _ => WorkerState::Ready,
    }
}

/// Wire value of a worker state.
pub fn state_to_wire(state: WorkerState) -> i32 {
    (match state {
        WorkerState::Ready => pb::WorkerState::Ready,
        WorkerState::Cordoned => pb::WorkerState::Cordoned,
        WorkerState::Draining => pb::WorkerState::Draining,
    }) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_values_read_as_the_schema_says_and_known_ones_round_trip() {
        assert_eq!(role_from_wire(0), Role::Both);
        assert_eq!(role_from_wire(99), Role::Both);
        for role in [Role::Prefill, Role::Decode, Role::Both] {
            assert_eq!(role_from_wire(role_to_wire(role)), role);
        }
        for engine in [Engine::Vllm, Engine::Sglang, Engine::Trtllm] {
            assert_eq!(engine_from_wire(engine_to_wire(engine)), engine);
        }
        assert_eq!(state_from_wire(0), WorkerState::Ready);
        for state in [WorkerState::Ready, WorkerState::Cordoned, WorkerState::Draining] {
            assert_eq!(state_from_wire(state_to_wire(state)), state);
        }
    }
}
