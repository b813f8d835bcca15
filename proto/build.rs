//! Compiles `kvmesh/v1/*.proto` with protox (a protobuf compiler in Rust, so no `protoc` is needed):
//! prost messages always, tonic service stubs only with the `grpc` feature.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["kvmesh/v1/fleet.proto", "kvmesh/v1/state.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["."])?;
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_server(grpc)
        .build_client(grpc)
        .build_transport(grpc)
        .compile_fds(descriptors)?;
    Ok(())
}
