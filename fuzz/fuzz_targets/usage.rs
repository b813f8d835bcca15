//! An engine's response body, fed to the usage scanner in chunks cut where the first bytes say.
#![no_main]

use kvmesh_core::usage::{BodyKind, UsageScanner};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else { return };
    let kind = if first & 1 == 0 { BodyKind::Json } else { BodyKind::EventStream };
    let mut scanner = UsageScanner::with_limit(kind, 4096);
    let step = usize::from(first >> 1).max(1);
    for chunk in body.chunks(step) {
        scanner.feed(chunk);
        if scanner.is_complete() {
            break;
        }
    }
    let _ = scanner.finish();
    let _ = scanner.stats();
});
