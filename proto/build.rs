fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protoc comes from a crate so a fresh machine needs nothing from the system.
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc);
    config.compile_protos(
        &[
            "proto/weir/plan/v1/plan.proto",
            "proto/sparkplug/sparkplug_b.proto",
        ],
        &["proto"],
    )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
