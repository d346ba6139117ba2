pub fn bench(_args: BenchArgs) -> anyhow::Result<std::process::ExitCode> { anyhow::bail!("not yet") }
#[derive(clap::Args)] pub struct BenchArgs {}
