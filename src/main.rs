//! `weir`: the command line. Thin on purpose: clap parses, the crates do the work.

mod bench;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "Edge stream processor for industrial IoT: SQL pipelines over sensor telemetry",
    long_about = "Weir runs SQL pipelines on a gateway: sources (files, the sensor simulator) \
                  flow through filters, event-time windows and anomaly detectors as Arrow \
                  batches, and results go to sinks.\n\n\
                  Start with: weir run examples/vibration.sql"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a SQL file and print the plan of each pipeline (EXPLAIN).
    #[command(after_help = "Examples:\n  \
        weir compile examples/vibration.sql\n  \
        weir compile examples/vibration.sql --out vibration.plan\n\n\
        Errors are printed as FILE:LINE:COL: error: message, with a hint where one helps;\n\
        every error in the file is reported and the exit code is 1.")]
    Compile {
        /// The SQL file: CREATE SOURCE, CREATE SINK and CREATE PIPELINE statements.
        file: PathBuf,
        /// Also write the encoded plans (length-delimited protobuf) to this file.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Run the pipelines of one or more SQL files until their sources end or Ctrl-C.
    #[command(after_help = "Examples:\n  \
        weir run examples/vibration.sql\n  \
        weir run examples/vibration.sql --json --dead-letters bad.jsonl\n\n\
        Finite sources (files, a simulator with duration_s) flush every open window at their\n\
        end and weir exits 0. A summary per pipeline is printed to stderr (or as JSON with --json).")]
    Run(run::RunArgs),
    /// Measure throughput, latency and memory of the vibration workload, checking every result.
    #[command(after_help = "Examples:\n  \
        weir bench\n  \
        weir bench --sensors 100 --seconds 60 --json\n  \
        weir bench --scenario blocks\n\n\
        Build with --release for meaningful numbers: cargo run --release -- bench")]
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Compile { file, out } => compile(&file, out.as_deref()),
        Command::Run(args) => run::run(args),
        Command::Bench(args) => bench::bench(args),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn compile(file: &std::path::Path, out: Option<&std::path::Path>) -> anyhow::Result<ExitCode> {
    let sql = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    match weir_planner::compile(&sql) {
        Ok(compiled) => {
            for (i, plan) in compiled.pipelines.iter().enumerate() {
                if i > 0 {
                    println!();
                }
                print!("{}", weir_planner::explain(plan));
            }
            if let Some(out) = out {
                std::fs::write(out, compiled.encode())
                    .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", out.display()))?;
                eprintln!(
                    "wrote {} pipeline plan(s) to {}",
                    compiled.pipelines.len(),
                    out.display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(error) => {
            eprintln!("{}", error.render(&file.display().to_string()));
            Ok(ExitCode::FAILURE)
        }
    }
}
