//! A client's request body, as the filter parses it: any bytes give a request or an error.
#![no_main]

use kvmesh_core::request::{Endpoint, RequestLimits, parse_request};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else { return };
    let endpoint = if first & 1 == 0 { Endpoint::Completions } else { Endpoint::ChatCompletions };
    if let Ok(request) = parse_request(endpoint, body, &RequestLimits::default()) {
        // Everything the router reads from a parsed request.
        let _ = (request.model(), request.cache_salt(), request.max_output_tokens());
    }
});
