fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc comes from a crate so a fresh machine needs nothing from the system.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    // The descriptor set feeds gRPC server reflection, so generic gRPC tools need no .proto files.
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("weir_descriptor.bin"))
        .build_client(true)
        .build_server(true)
        .compile_with_config(
            config,
            &[
                "proto/weir/plan/v1/plan.proto",
                "proto/weir/cloud/v1/control.proto",
                "proto/weir/engine/v1/checkpoint.proto",
                "proto/sparkplug/sparkplug_b.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
