//! Compiles proto/ with protox (no protoc needed), generates tonic clients and
//! servers, proto3-JSON serde impls (pbjson) and the descriptor set that server
//! reflection serves.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/carevault/v1/patient.proto",
        "proto/carevault/v1/coverage.proto",
        "proto/carevault/v1/audit.proto",
        "proto/carevault/v1/access.proto",
        "proto/carevault/v1/keys.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let fds = protox::compile(protos, ["proto"])?;
    let descriptor_bytes = fds.encode_to_vec();
    std::fs::write(out.join("carevault_descriptor.bin"), &descriptor_bytes)?;

    // Servers are not generated: carevault serves its methods through its
    // own pass-through codec (src/api/grpc.rs), which authenticates before
    // decoding. Clients are generated for tests, the CLI and the bench.
    tonic_prost_build::configure()
        .build_server(false)
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds(fds)?;

    // Every field in JSON output, defaults included, so that an empty result
    // reads as an empty list rather than a missing one.
    pbjson_build::Builder::new().register_descriptors(&descriptor_bytes)?.emit_fields().build(&[".carevault"])?;
    Ok(())
}
