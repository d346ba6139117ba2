//! `weir`: the command line. Thin on purpose: clap parses, the crates do the work.

mod bench;
mod cloud;
mod demo;
mod gateway;
mod http;
mod run;
mod soak;
mod top;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc 3's option list (`mimalloc.h`), which libmimalloc-sys
/// does not name; the versions are pinned, and a test checks the position still holds the
/// option's documented default.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory stays with the process before it goes back to the system, unless
/// `MIMALLOC_PURGE_DELAY` says otherwise. mimalloc keeps freed pages for a second by default,
/// to reuse them cheaply; at 1M samples/s that held 7-12 MB more resident, and returning
/// them at once cost no CPU the benchmarks could measure.
const PURGE_DELAY_MS: std::ffi::c_long = 0;

#[allow(unsafe_code)]
fn configure_allocator() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets one of mimalloc's process-wide options, which it reads atomically; any
    // value is valid for this one (milliseconds).
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
}

#[derive(Parser)]
#[command(
    name = "weir",
    version,
    about = "Edge stream processor for industrial IoT: SQL pipelines over sensor telemetry",
    long_about = "Weir runs SQL pipelines on a gateway: sources (MQTT, files, the sensor \
                  simulator) flow through filters, event-time windows and anomaly detectors as \
                  Arrow batches, and results go to sinks (MQTT, files, stdout).\n\n\
                  Start with: weir demo"
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
        weir bench --scenario blocks\n  \
        weir bench --scenario mqtt-rows --broker both\n  \
        weir bench --scenario mqtt-blocks-realtime --realtime-sensors 1000 --seconds 30\n  \
        weir bench --scenario mqtt-backlog --backlog 200000 --backlog-qos 1 --broker mosquitto\n  \
        weir bench --scenario cloud-fanout --gateways 10000\n  \
        weir bench --scenario blocks,blocks-ckpt --seconds 150\n  \
        weir bench --scenario uplink-drain --seconds 3600 --sensors 100\n  \
        weir bench --scenario recovery --kills 20\n\n\
        blocks-ckpt and json-rows-ckpt are blocks and json-rows with a checkpoint every second\n\
        into RocksDB. uplink-drain fills an uplink queue with --seconds of --sensors sensors'\n\
        1-second windows and drains it to an in-process cloud over gRPC until all is stored.\n\
        recovery kills a gateway under load --kills times (SIGKILL) and reports the time from\n\
        each kill to the first new result of the restarted gateway, checking every result.\n\
        The MQTT scenarios publish from a separate `weir` process through the embedded broker\n\
        (rumqttd, inside the measured process) and/or Mosquitto (a child process), and run each\n\
        scenario and broker in a fresh process. mqtt-rows and mqtt-backlog compare the pipeline\n\
        with a subscriber that only counts messages; mqtt-blocks-realtime reports CPU (% of one\n\
        core), peak RSS and the p99 from the watermark passing a window's end to its result\n\
        arriving on the sink topic. Mosquitto must be installed (apt-get install mosquitto).\n\
        cloud-fanout starts `weir cloud` and G simulated gateway agents (real gRPC, one\n\
        connection each) and reports the time for a deploy to reach every agent, the cloud's\n\
        memory per connected gateway and how long all take to reconnect after a cloud restart.\n\n\
        Build with --release for meaningful numbers: cargo run --release -- bench")]
    Bench(bench::BenchArgs),
    #[command(hide = true)]
    BenchPublisher(bench::PublisherArgs),
    /// Run the site process: MQTT broker, pipelines, admin API; hot deploy without restarts.
    #[command(after_help = "Examples:\n  \
        weir gateway --pipelines examples/gateway\n  \
        weir gateway --config weir.toml\n  \
        weir gateway --broker mqtt://10.0.0.5:1883 --admin 127.0.0.1:9464\n\n\
        The embedded broker listens on 127.0.0.1:1883 unless configured otherwise; sensors and\n\
        mosquitto_pub/sub connect to it as to any broker. Manage pipelines while it runs with\n\
        `weir pipelines` and watch it with `weir top`. SIGTERM or Ctrl-C stops the sources,\n\
        drains in-flight batches to the sinks and exits 0.")]
    Gateway(gateway::GatewayArgs),
    /// Check gateway configuration files.
    #[command(subcommand)]
    Config(gateway::ConfigCommand),
    /// List, add, replace and remove the pipelines of a running gateway.
    #[command(
        subcommand,
        after_help = "Examples:\n  \
        weir pipelines list\n  \
        weir pipelines add examples/gateway/vibration.sql\n  \
        weir pipelines replace vibration_rms new_rms.sql\n  \
        weir pipelines rm vibration_rms --gateway http://10.0.0.7:9464 --token $TOKEN\n\n\
        Other pipelines keep running, untouched, while one is added, replaced or removed."
    )]
    Pipelines(gateway::PipelinesCommand),
    /// See the whole gateway at work: broker, 100 simulated sensors over MQTT, two pipelines.
    #[command(after_help = "Examples:\n  \
        weir demo\n  \
        weir demo --seconds 30\n  \
        weir demo --json | head   # result rows as JSON lines\n\n\
        Starts a gateway with its embedded MQTT broker (127.0.0.1:1883, or a free port), 100\n\
        sensors publishing 1 kHz vibration in 100-sample blocks with injected faults, and the\n\
        pipelines of examples/gateway/vibration.sql: 1-second RMS and peak per sensor, and\n\
        z-score anomaly events. Results are read back from their MQTT topics.")]
    Demo(demo::DemoArgs),
    /// A live terminal view of a gateway: pipelines, rates, latency, errors.
    #[command(after_help = "Examples:\n  \
        weir top\n  \
        weir top --gateway http://10.0.0.7:9464 --token $TOKEN\n  \
        weir top --once   # one plain-text frame, for scripts")]
    Top(top::TopArgs),
    /// Run the control plane, or manage it: gateways, tokens, the audit log.
    #[command(after_help = "Examples:\n  \
        weir cloud                                   # serve on 127.0.0.1:8470, data in ./weir-cloud\n  \
        weir cloud --listen 0.0.0.0:8470 --tls --tls-name cloud.example --data /var/lib/weir-cloud\n  \
        export WEIR_TOKEN=$(cat weir-cloud/admin.token)\n  \
        weir cloud gateways add plant1-a --label site=plant1 --label line=3\n  \
        weir cloud gateways label plant1-a line=4\n  \
        weir cloud tokens add analyst --role deployer\n  \
        weir cloud audit\n\n\
        The cloud compiles SQL once, signs each pipeline version (Ed25519) and sends it to the\n\
        gateways whose labels match a deployment, over the stream each gateway opens to it.\n\
        One port serves the HTTP API (/api/v1, /openapi.json, /metrics) and gRPC (with standard\n\
        health checking and server reflection v1). State lives in RocksDB under --data.")]
    Cloud(cloud::CloudArgs),
    /// Publish a SQL file to the cloud: new signed versions, to the gateways a selector picks.
    #[command(after_help = "Examples:\n  \
        weir deploy examples/gateway/vibration.sql --selector 'site=plant1,line!=3'\n  \
        weir deploy alerts.sql --name plant-alerts --selector site=plant1 --priority 10\n  \
        weir deploy vibration.sql --selector site=plant1 --canary 2 --bake 5m\n\n\
        The cloud compiles the SQL (errors come back as FILE:LINE:COL), stores a new immutable\n\
        version of each pipeline whose SQL changed, and creates or updates the deployment. A\n\
        gateway runs the union of the deployments that match its labels; two that put the same\n\
        pipeline on one gateway are settled by priority, then by the newer. With --canary N the\n\
        new versions reach N gateways first and the rest only after the canaries ran them\n\
        healthily for --bake; a failing canary rolls back on its own (weir status shows why).")]
    Deploy(cloud::DeployArgs),
    /// Return a deployment to its previous versions on every gateway.
    #[command(after_help = "Example:\n  weir rollback vibration_rms")]
    Rollback(cloud::RollbackArgs),
    /// The fleet: every gateway, online or last seen, desired vs running versions, drift.
    #[command(after_help = "Examples:\n  \
        weir status\n  \
        weir status --cloud http://cloud.example:8470 --json")]
    Status(cloud::StatusArgs),
    /// Run SQL over the results gateways sent to the cloud (one table per uplink stream).
    #[command(after_help = "Examples:\n  \
        weir query \"SELECT gateway, sensor, window_start, rms FROM vibration_rms ORDER BY window_start DESC LIMIT 10\"\n  \
        weir query \"SELECT sensor, max(peak) FROM vibration_rms WHERE date = '2026-12-02' GROUP BY sensor\" --csv\n  \
        weir query \"SELECT count(*) FROM vibration_alerts\" --json\n\n\
        Results arrive through each gateway's durable uplink (`cloud` sinks) and are stored once\n\
        per (gateway, stream, sequence number) as Parquet under the cloud's data directory\n\
        (results/STREAM/date=YYYY-MM-DD/), so other tools can read them too. Every table has a\n\
        `gateway` column and a `date` partition column. Only reading is allowed (role viewer).")]
    Query(cloud::QueryArgs),
    /// Kill -9 a gateway again and again under load; check the cloud got every result once.
    #[command(after_help = "Examples:\n  \
        weir soak --kills 100\n  \
        weir soak --kills 20 --seconds 40 --json\n  \
        weir soak --kills 50 --signal mixed   # SIGKILL and SIGTERM in turn\n\n\
        Runs a cloud in this process and a `weir gateway` child enrolled with it, with a\n\
        deterministic simulator (4 sensors at 100 Hz by default, realtime) into a `cloud` sink\n\
        computing 1-second RMS per sensor. The gateway is killed with SIGKILL after a random\n\
        150-900 ms and restarted, N times; afterwards every window a run without crashes\n\
        produces must be stored in the cloud exactly once, with the same value. Prints windows\n\
        checked, lost, duplicated and with other values (exits 1 unless all are 0), and the\n\
        time from each kill to the first new result at the restarted gateway's sink.")]
    Soak(soak::SoakArgs),
}

fn main() -> ExitCode {
    configure_allocator();
    // rumqttd logs every client that drops its connection as an error; the gateway counts
    // what matters in its own metrics, so the embedded broker is quiet unless asked.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("WEIR_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,rumqttd=off")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    // One TLS crypto provider for the whole process (MQTT, gRPC, the HTTP clients): ring.
    // The HTTP clients are given it explicitly too (crate::http), so tests need no set-up.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Compile { file, out } => compile(&file, out.as_deref()),
        Command::Run(args) => run::run(args),
        Command::Bench(args) => bench::bench(args),
        Command::BenchPublisher(args) => bench::publisher(args),
        Command::Gateway(args) => gateway::gateway(args),
        Command::Demo(args) => demo::demo(args),
        Command::Config(command) => gateway::config(command),
        Command::Pipelines(command) => gateway::pipelines(command),
        Command::Cloud(args) => cloud::cloud(args),
        Command::Deploy(args) => cloud::deploy(args),
        Command::Rollback(args) => cloud::rollback(args),
        Command::Status(args) => cloud::status(args),
        Command::Query(args) => cloud::query(args),
        Command::Soak(args) => soak::soak(args),
        Command::Top(args) => gateway::runtime()
            .block_on(top::run(args))
            .map(|()| ExitCode::SUCCESS),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(unsafe_code)]
    fn the_purge_delay_option_is_where_main_sets_it() {
        // SAFETY: reads a mimalloc option. mimalloc 3 documents purge_delay's default as
        // 1000 ms; no other option around that position defaults to it.
        let default = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
        assert_eq!(default, 1000);
    }
}
