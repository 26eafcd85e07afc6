//! Generates the gRPC code for every proto under `proto/`, with protoc from
//! `protoc-bin-vendored` so a fresh machine needs no system protoc, and writes one file
//! descriptor set that the daemons serve through gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let protos = [
        "credits/ledger/v1/ledger.proto",
        "credits/payments/v1/payments.proto",
        "credits/recharge/v1/recharge.proto",
        "credits/portal/v1/portal.proto",
    ];
    let files: Vec<PathBuf> = protos.iter().map(|p| root.join(p)).collect();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("credits_descriptor.bin"))
        .compile_with_config(config, &files, &[root])?;
    Ok(())
}
