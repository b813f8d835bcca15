//! `kvmesh demo` (being written).

use clap::Args;

/// Options of `kvmesh demo`.
#[derive(Args)]
pub struct DemoArgs {}

/// Runs the demo.
pub fn run(_args: DemoArgs) -> anyhow::Result<std::process::ExitCode> {
    Ok(std::process::ExitCode::SUCCESS)
}
