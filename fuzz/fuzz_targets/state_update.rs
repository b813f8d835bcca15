//! The control plane's state stream as one filter VM applies it (`StateUpdate` protobuf), then a
//! request routed on whatever state resulted.
#![no_main]

use kvmesh_core::request::Endpoint;
use kvmesh_filter::FilterConfig;
use kvmesh_filter::relay::ApplyState;
use kvmesh_filter::router::Router;
use kvmesh_proto::v1 as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// A filter that follows the control plane's state (its workers and models come from the updates).
const CONFIG: &str = r#"{"state":{}}"#;
const BODY: &[u8] = br#"{"model":"m","prompt":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31,32,33]}"#;

fuzz_target!(|data: &[u8]| {
    let config =
        FilterConfig::from_bytes(Some(CONFIG.as_bytes())).expect("fuzz set-up: the configuration is valid");
    let mut router = Router::new(&config).expect("fuzz set-up: the router builds");
    // Updates separated by 0xfe 0xfe, applied in order; a first byte of 0 resets first.
    let mut rest = data;
    while !rest.is_empty() {
        let end = rest.windows(2).position(|w| w == [0xfe, 0xfe]).unwrap_or(rest.len());
        let (message, tail) = rest.split_at(end);
        rest = tail.get(2..).unwrap_or(&[]);
        let Some((&first, payload)) = message.split_first() else { continue };
        if first == 0 {
            router.reset();
        }
        if let Ok(update) = pb::StateUpdate::decode(payload)
            && let Some(body) = &update.body
        {
            router.apply(body);
        }
    }
    let _ = router.models_wanted();
    if let Ok(routed) = router.route(Endpoint::Completions, BODY, 1_767_225_600_000, 1_767_225_600) {
        router.finish(&routed);
    }
});
