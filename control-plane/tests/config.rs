//! The example configuration in the repo parses, validates, and says what the defaults are.

use std::path::PathBuf;

use kvmesh_control_plane::Config;
use kvmesh_core::PolicyKind;

fn example() -> Config {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("kvmesh.example.yaml");
    Config::from_file(&path).expect("kvmesh.example.yaml parses")
}

#[test]
fn example_config_parses_and_validates() {
    let mut config = example();
    assert_eq!(config.models.len(), 2);
    assert_eq!(config.models[0].block_size, Some(16));
    assert_eq!(config.models[1].routing.policy, PolicyKind::LoadOnly);
    // Its tokenizer path is an example; point it at a real one to validate the rest.
    config.models[0].tokenizer_dir = Some(kvmesh_tests::tokenizer_dir("qwen3"));
    config.validate().expect("example config validates");
}

#[test]
fn example_config_states_the_defaults() {
    let mut config = example();
    config.models.clear();
    assert_eq!(config, Config::default(), "kvmesh.example.yaml must list the defaults as they are");
}

#[test]
fn a_missing_tokenizer_dir_is_named() {
    let err = example().validate().unwrap_err().to_string();
    assert!(err.contains("models[0].tokenizer_dir"), "{err}");
}
