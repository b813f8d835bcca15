//! `kvmesh`: one command for every part of the system. It wires crates together and holds no
//! routing logic of its own.

use clap::{Parser, Subcommand};

mod demo;
mod serve;
mod tokenize;

/// KV-cache-aware routing for LLM inference fleets behind Envoy.
#[derive(Parser)]
#[command(name = "kvmesh", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a whole fleet on this machine: nats-server, the control plane, workers (simulated or real
    /// engines) with their agents, and Envoy with the kvmesh filter; Ctrl-C stops everything.
    Serve(Box<serve::ServeArgs>),
    /// Route a built-in multi-turn chat workload over a simulated fleet and print where it went
    /// (in-process, or with --serve through a live `kvmesh serve` fleet).
    Demo(demo::DemoArgs),
    /// Print the token ids the engine computes for text (or, with --request, an OpenAI request) on stdin.
    Tokenize(tokenize::TokenizeArgs),
    /// Run the control plane: NATS ingest, fleet index, gRPC state stream to filters, REST admin.
    ControlPlane(kvmesh_control_plane::ControlPlaneArgs),
    /// Run a simulated inference engine speaking vLLM's, SGLang's or TensorRT-LLM's wire formats.
    Sim(Box<kvmesh_sim::SimArgs>),
    /// Run the agent beside one worker: engine KV events, metrics and GPU telemetry to NATS.
    Agent(kvmesh_agent::AgentArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Demo(args) => demo::run(args),
        Command::Tokenize(args) => tokenize::run(args),
        Command::ControlPlane(args) => kvmesh_control_plane::run(args),
        Command::Sim(args) => {
            kvmesh_sim::run(*args).map(|()| std::process::ExitCode::SUCCESS).map_err(Into::into)
        }
        Command::Agent(args) => kvmesh_agent::main(args).map_err(Into::into),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("kvmesh: {err:#}");
            std::process::ExitCode::from(1)
        }
    }
}
