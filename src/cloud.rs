//! `weir cloud` (the control plane and its admin commands), `weir deploy`, `weir rollback`
//! and `weir status`: the CLI of the cloud's HTTP API.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use weir_cloud::tls::TlsMode;
use weir_cloud::{Cloud, CloudConfig, GatewayView};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CloudArgs {
    #[command(subcommand)]
    command: Option<CloudCommand>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Where the store, the plan-signing key and the first admin token live.
    #[arg(long, value_name = "DIR", default_value = "weir-cloud")]
    data: PathBuf,
    /// The address of the HTTP API and of gRPC for the gateways (one port).
    #[arg(long, default_value = "127.0.0.1:8470")]
    listen: SocketAddr,
    /// How often gateways send a heartbeat; three missed ones mark a gateway offline.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// Serve TLS with a certificate from the cloud's own authority, made on first start in
    /// DIR/tls (give gateways and the CLI DIR/tls/ca.pem).
    #[arg(long)]
    tls: bool,
    /// Extra host names or addresses for the cloud's certificate (with --tls); repeat.
    #[arg(long = "tls-name", value_name = "NAME", requires = "tls")]
    tls_names: Vec<String>,
    /// Serve TLS with this certificate chain (PEM) instead, from your own PKI.
    #[arg(
        long,
        value_name = "FILE",
        requires = "tls_key",
        conflicts_with = "tls"
    )]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Allow plain HTTP on a non-loopback address (only behind a TLS-terminating proxy).
    #[arg(long)]
    insecure: bool,
    /// Where uplinked results are stored as Parquet: a directory (default DIR/results), or
    /// s3://BUCKET/PREFIX on S3 or an S3-compatible store such as MinIO, configured by the
    /// AWS_* environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT,
    /// AWS_ALLOW_HTTP=true for a plain-HTTP endpoint).
    #[arg(long, value_name = "LOCATION", env = "WEIR_RESULTS")]
    results: Option<String>,
}

#[derive(Debug, Subcommand)]
enum CloudCommand {
    /// Register, label, list and revoke gateways.
    #[command(subcommand)]
    Gateways(GatewaysCommand),
    /// Create API tokens with a role.
    #[command(subcommand)]
    Tokens(TokensCommand),
    /// Show the audit log: who changed what, when (admin role).
    Audit {
        #[command(flatten)]
        client: CloudClientArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum GatewaysCommand {
    /// Register a gateway and print its one-time enrollment token.
    #[command(after_help = "Example:\n  \
        weir cloud gateways add plant1-a --label site=plant1 --label line=3\n  \
        weir gateway --cloud http://CLOUD:8470 --enroll we_...   # on the gateway, once")]
    Add {
        name: String,
        /// A label, key=value; repeat for more.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        #[command(flatten)]
        client: CloudClientArgs,
    },
    /// List gateways with labels and whether they are online.
    List {
        #[command(flatten)]
        client: CloudClientArgs,
        #[arg(long)]
        json: bool,
    },
    /// Set (key=value) or remove (key-) labels; what the gateway runs follows at once.
    #[command(after_help = "Example:\n  weir cloud gateways label plant1-a line=4 canary-")]
    Label {
        name: String,
        #[arg(required = true, value_name = "KEY=VALUE|KEY-")]
        changes: Vec<String>,
        #[command(flatten)]
        client: CloudClientArgs,
    },
    /// Print a new one-time enrollment token for a registered gateway.
    Enroll {
        name: String,
        #[command(flatten)]
        client: CloudClientArgs,
    },
    /// Revoke a gateway: its credential stops working and its stream is closed.
    Revoke {
        name: String,
        #[command(flatten)]
        client: CloudClientArgs,
    },
}

#[derive(Debug, Subcommand)]
enum TokensCommand {
    /// Create an API token: viewer (read), deployer (deploy, roll back), admin (everything).
    #[command(after_help = "Example:\n  weir cloud tokens add ci --role deployer")]
    Add {
        name: String,
        #[arg(long, value_parser = ["viewer", "deployer", "admin"])]
        role: String,
        #[command(flatten)]
        client: CloudClientArgs,
    },
}

/// How the CLI reaches the cloud's API.
#[derive(Debug, Args)]
pub struct CloudClientArgs {
    /// The cloud's address.
    #[arg(long, env = "WEIR_CLOUD", default_value = "http://127.0.0.1:8470")]
    cloud: String,
    /// An API token (the first admin token is in the cloud's data directory, admin.token).
    #[arg(long, env = "WEIR_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The certificate authority to trust for an https:// cloud (its tls/ca.pem); default:
    /// the system's roots.
    #[arg(long, env = "WEIR_CA", value_name = "FILE")]
    ca: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DeployArgs {
    /// The SQL file: sources, sinks and one or more pipelines.
    file: PathBuf,
    /// Which gateways: comma-separated key=value, key!=value, key, !key (empty: all).
    #[arg(long, default_value = "")]
    selector: String,
    /// The deployment's name (default: the first pipeline's name).
    #[arg(long)]
    name: Option<String>,
    /// Wins over lower priorities when two deployments put the same pipeline on a gateway.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
    /// Staged rollout: send the new versions to this many matching gateways first.
    #[arg(long, default_value_t = 0, value_name = "N")]
    canary: u32,
    /// How long every canary must run the new versions without a restart, a failure or too
    /// many errors before the other gateways follow; otherwise the canaries roll back.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    bake: Duration,
    /// More errors than this on a canary's pipeline fails the rollout.
    #[arg(long, default_value_t = 10)]
    max_errors: u64,
    /// Deploy even where a new version cannot take over the running version's state (a
    /// changed window, aggregate, detector or source): its open windows start empty.
    /// Without it, such a deploy is refused and nothing changes.
    #[arg(long)]
    fresh: bool,
    #[command(flatten)]
    client: CloudClientArgs,
}

#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// The deployment to return to its previous versions.
    deployment: String,
    /// Roll back even where the earlier versions cannot take over the running state.
    #[arg(long)]
    fresh: bool,
    #[command(flatten)]
    client: CloudClientArgs,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// Read-only SQL; each uplink stream is a table (with a `gateway` column and a `date`
    /// partition column), e.g. "SELECT * FROM vibration_rms WHERE sensor = 's1' LIMIT 10".
    sql: String,
    /// One JSON object per row.
    #[arg(long, conflicts_with = "csv")]
    json: bool,
    /// CSV with a header row.
    #[arg(long)]
    csv: bool,
    #[command(flatten)]
    client: CloudClientArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    client: CloudClientArgs,
    /// Print the API's JSON.
    #[arg(long)]
    json: bool,
}

/// A cloud in this process on a free loopback port, with its data in `dir`, and an admin
/// caller for its fleet: for `weir soak` and the benchmarks.
pub(crate) fn in_process(
    runtime: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    heartbeat_interval: Duration,
) -> anyhow::Result<(Cloud, weir_cloud::fleet::Caller)> {
    let cloud = runtime.block_on(Cloud::start(CloudConfig {
        data_dir: dir.to_owned(),
        listen: ([127, 0, 0, 1], 0).into(),
        heartbeat_interval,
        ..CloudConfig::default()
    }))?;
    let admin = weir_cloud::fleet::Caller {
        name: "weir".into(),
        role: weir_cloud::Role::Admin,
    };
    Ok((cloud, admin))
}

pub fn cloud(args: CloudArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        None => serve(args.serve),
        Some(command) => block_on(admin(command)),
    }
}

fn block_on<F: Future<Output = anyhow::Result<ExitCode>>>(future: F) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?
        .block_on(future)
}

fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(async move {
        let tls = match (&args.tls_cert, &args.tls_key) {
            (Some(cert), Some(key)) => TlsMode::Files {
                cert: cert.clone(),
                key: key.clone(),
            },
            _ if args.tls => TlsMode::SelfSigned {
                names: args.tls_names.clone(),
            },
            _ => TlsMode::Off,
        };
        let scheme = if tls == TlsMode::Off { "http" } else { "https" };
        let cloud = Cloud::start(CloudConfig {
            data_dir: args.data.clone(),
            listen: args.listen,
            heartbeat_interval: args.heartbeat,
            tls,
            insecure: args.insecure,
            results: args.results.clone(),
        })
        .await?;
        let url = format!("{scheme}://{}", cloud.address());
        if let Some(ca) = cloud.ca_file() {
            eprintln!(
                "TLS: gateways and the CLI trust {} (weir gateway --cloud-ca FILE; WEIR_CA=FILE)",
                ca.display()
            );
        }
        eprintln!(
            "weir cloud listening on {url} (API and gateway gRPC), data in {}",
            args.data.display()
        );
        if cloud.first_admin_token().is_some() {
            eprintln!(
                "first start: an admin token was written to {}\n  export WEIR_TOKEN=$(cat {})",
                args.data.join("admin.token").display(),
                args.data.join("admin.token").display()
            );
        }
        eprintln!("next: weir cloud gateways add NAME --label site=plant1   (Ctrl-C stops)");
        weir_gateway::shutdown_signal().await;
        cloud.shutdown().await;
        eprintln!("stopped");
        Ok(ExitCode::SUCCESS)
    })
}

async fn admin(command: CloudCommand) -> anyhow::Result<ExitCode> {
    match command {
        CloudCommand::Gateways(GatewaysCommand::Add {
            name,
            labels,
            client,
        }) => {
            let labels = parse_labels(&labels)?;
            let body = call(
                &client,
                reqwest::Method::POST,
                "/api/v1/gateways",
                Some(json!({ "name": name, "labels": labels })),
            )
            .await?;
            let token = body["enrollment_token"].as_str().unwrap_or("?");
            println!(
                "registered gateway {name} ({})",
                labels_text(&body["labels"])
            );
            println!("enrollment token (one use): {token}");
            println!(
                "on the gateway: weir gateway --cloud {} --enroll {token}",
                client.cloud.trim_end_matches('/')
            );
        }
        CloudCommand::Gateways(GatewaysCommand::List { client, json }) => {
            let body = call(&client, reqwest::Method::GET, "/api/v1/gateways", None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&body)?);
            } else {
                let gateways: Vec<GatewayView> = serde_json::from_value(body)?;
                println!(
                    "{:<20} {:<9} {:<14} LABELS",
                    "GATEWAY", "STATE", "LAST SEEN"
                );
                for g in &gateways {
                    println!(
                        "{:<20} {:<9} {:<14} {}",
                        g.name,
                        gateway_state(g),
                        ago(g.last_seen_ms),
                        labels_text(&json!(g.labels))
                    );
                }
            }
        }
        CloudCommand::Gateways(GatewaysCommand::Label {
            name,
            changes,
            client,
        }) => {
            let mut set = serde_json::Map::new();
            let mut remove = Vec::new();
            for change in &changes {
                if let Some((key, value)) = change.split_once('=') {
                    set.insert(key.to_owned(), json!(value));
                } else if let Some(key) = change.strip_suffix('-') {
                    remove.push(key.to_owned());
                } else {
                    bail!("'{change}': write key=value to set a label or key- to remove one");
                }
            }
            let path = format!("/api/v1/gateways/{name}/labels");
            let body = call(
                &client,
                reqwest::Method::PUT,
                &path,
                Some(json!({ "set": set, "remove": remove })),
            )
            .await?;
            println!("{name}: {}", labels_text(&body["labels"]));
        }
        CloudCommand::Gateways(GatewaysCommand::Enroll { name, client }) => {
            let path = format!("/api/v1/gateways/{name}/enrollment");
            let body = call(&client, reqwest::Method::POST, &path, None).await?;
            println!(
                "enrollment token for {name} (one use): {}",
                body["enrollment_token"].as_str().unwrap_or("?")
            );
        }
        CloudCommand::Gateways(GatewaysCommand::Revoke { name, client }) => {
            let path = format!("/api/v1/gateways/{name}");
            call(&client, reqwest::Method::DELETE, &path, None).await?;
            println!("revoked {name}");
        }
        CloudCommand::Tokens(TokensCommand::Add { name, role, client }) => {
            let body = call(
                &client,
                reqwest::Method::POST,
                "/api/v1/tokens",
                Some(json!({ "name": name, "role": role })),
            )
            .await?;
            println!("token {name} ({role}), shown once:");
            println!("{}", body["token"].as_str().unwrap_or("?"));
        }
        CloudCommand::Audit { client, json } => {
            let body = call(&client, reqwest::Method::GET, "/api/v1/audit", None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&body)?);
            } else {
                for entry in body.as_array().into_iter().flatten() {
                    println!(
                        "{:>5}  {}  {:<20} {:<24} {}",
                        entry["seq"].as_u64().unwrap_or(0),
                        timestamp(entry["at_ms"].as_u64()),
                        entry["actor"].as_str().unwrap_or("?"),
                        entry["action"].as_str().unwrap_or("?"),
                        entry["detail"].as_str().unwrap_or("")
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn deploy(args: DeployArgs) -> anyhow::Result<ExitCode> {
    block_on(async move {
        let sql = std::fs::read_to_string(&args.file)
            .with_context(|| format!("cannot read {}", args.file.display()))?;
        let body = call(
            &args.client,
            reqwest::Method::POST,
            "/api/v1/deployments",
            Some(json!({
                "sql": sql,
                "file": args.file.display().to_string(),
                "selector": args.selector,
                "name": args.name,
                "priority": args.priority,
                "canary": args.canary,
                "bake_s": args.bake.as_secs(),
                "max_errors": args.max_errors,
                "fresh": args.fresh,
            })),
        )
        .await?;
        print_outcome("deployed", &body);
        Ok(ExitCode::SUCCESS)
    })
}

pub fn rollback(args: RollbackArgs) -> anyhow::Result<ExitCode> {
    block_on(async move {
        let path = format!(
            "/api/v1/deployments/{}/rollback?fresh={}",
            args.deployment, args.fresh
        );
        let body = call(&args.client, reqwest::Method::POST, &path, None).await?;
        print_outcome("rolled back", &body);
        Ok(ExitCode::SUCCESS)
    })
}

fn print_outcome(what: &str, body: &Value) {
    let versions: Vec<String> = body["pipelines"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(p, v)| format!("{p} v{}", v.as_u64().unwrap_or(0)))
        .collect();
    let changed = body["changed"].as_array().map_or(0, Vec::len);
    let targets: Vec<&str> = body["targets"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    println!(
        "{what} {}: {} ({changed} new version(s))",
        body["deployment"].as_str().unwrap_or("?"),
        versions.join(", ")
    );
    for (pipeline, reason) in body["fresh"].as_object().into_iter().flatten() {
        println!(
            "{pipeline} starts fresh: {}",
            reason.as_str().unwrap_or("?")
        );
    }
    if targets.is_empty() {
        println!("no gateway matches the selector yet");
    } else {
        println!(
            "targets {} gateway(s): {}",
            targets.len(),
            targets.join(", ")
        );
    }
    let canaries: Vec<&str> = body["canaries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if !canaries.is_empty() {
        println!(
            "staged: canaries {} first; the others follow once they have baked (weir status)",
            canaries.join(", ")
        );
    }
}

pub fn query(args: QueryArgs) -> anyhow::Result<ExitCode> {
    block_on(async move {
        let response = request(
            &args.client,
            reqwest::Method::POST,
            "/api/v1/query",
            Some(serde_json::json!({ "sql": args.sql })),
        )
        .await?;
        let bytes = response.bytes().await.context("reading the answer")?;
        let reader = arrow::ipc::reader::StreamReader::try_new(bytes.as_ref(), None)
            .context("the answer is not an Arrow stream")?;
        let batches = reader
            .collect::<Result<Vec<_>, _>>()
            .context("the answer is not an Arrow stream")?;
        let mut out = std::io::stdout().lock();
        if args.json {
            let mut writer = arrow::json::LineDelimitedWriter::new(&mut out);
            writer.write_batches(&batches.iter().collect::<Vec<_>>())?;
            writer.finish()?;
        } else if args.csv {
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            for batch in &batches {
                writer.write(batch)?;
            }
        } else {
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            writeln!(
                out,
                "{}",
                arrow::util::pretty::pretty_format_batches(&batches)?
            )?;
            writeln!(out, "{rows} row(s)")?;
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    block_on(async move {
        let body = call(&args.client, reqwest::Method::GET, "/api/v1/status", None).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&body)?);
            return Ok(ExitCode::SUCCESS);
        }
        let gateways: Vec<GatewayView> = serde_json::from_value(body["gateways"].clone())?;
        println!(
            "{:<18} {:<9} {:<10} {:<22} {:>7} {:>7} {:<11} {:>10} {:>6}  NOTE",
            "GATEWAY",
            "STATE",
            "LAST SEEN",
            "PIPELINE",
            "DESIRED",
            "RUNNING",
            "STATUS",
            "IN/S",
            "ERRORS"
        );
        let mut drift = 0;
        for g in &gateways {
            let head = format!(
                "{:<18} {:<9} {:<10}",
                g.name,
                gateway_state(g),
                ago(g.last_seen_ms)
            );
            if g.pipelines.is_empty() {
                println!("{head} {:<22}", "-");
            }
            for (i, p) in g.pipelines.iter().enumerate() {
                let version = |v: Option<u64>| v.map_or("-".to_owned(), |v| format!("v{v}"));
                let note = if let Some(reason) = &p.rejected {
                    format!("REJECTED: {reason}")
                } else if let Some(error) = &p.error {
                    error.clone()
                } else if p.desired_version.is_none() {
                    "local pipeline".to_owned()
                } else if !p.in_sync {
                    "DRIFT".to_owned()
                } else {
                    String::new()
                };
                if p.desired_version.is_some() && !p.in_sync {
                    drift += 1;
                }
                println!(
                    "{:<39} {:<22} {:>7} {:>7} {:<11} {:>10} {:>6}  {note}",
                    if i == 0 { head.as_str() } else { "" },
                    p.name,
                    version(p.desired_version),
                    version(p.reported_version),
                    p.state.as_deref().unwrap_or("-"),
                    p.rows_in_per_s
                        .map_or("-".to_owned(), |r| format!("{r:.0}")),
                    p.errors,
                );
            }
        }
        if gateways.iter().any(|g| !g.streams.is_empty()) {
            println!();
            println!(
                "{:<18} {:<22} {:<7} {:>8} {:>10} {:>9} {:>10} {:>8} {:>8} {:>6}",
                "GATEWAY",
                "STREAM",
                "PRIO",
                "BACKLOG",
                "BYTES",
                "OLDEST",
                "STORED",
                "DROPPED",
                "MERGED",
                "DUPS"
            );
            for g in &gateways {
                for s in &g.streams {
                    let oldest = if s.pending == 0 {
                        "-".to_owned()
                    } else {
                        format!("{}s", s.oldest_pending_age_ms / 1000)
                    };
                    println!(
                        "{:<18} {:<22} {:<7} {:>8} {:>10} {:>9} {:>10} {:>8} {:>8} {:>6}",
                        g.name,
                        s.stream,
                        if s.priority.is_empty() {
                            "-"
                        } else {
                            s.priority.as_str()
                        },
                        s.pending,
                        s.pending_bytes,
                        oldest,
                        s.last_stored_seq
                            .map_or("-".to_owned(), |q| format!("#{q}")),
                        s.dropped_oldest + s.refused_newest + s.expired,
                        s.merged,
                        s.duplicates,
                    );
                }
            }
        }
        for d in body["deployments"].as_array().into_iter().flatten() {
            let name = d["name"].as_str().unwrap_or("?");
            if let Some(rollout) = d["rollout"].as_object() {
                let canaries: Vec<&str> = rollout["canaries"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                println!(
                    "deployment {name}: rolling out, canaries {} healthy for {}s of {}s",
                    canaries.join(", "),
                    rollout["baked_s"].as_u64().unwrap_or(0),
                    rollout["bake_s"].as_u64().unwrap_or(0)
                );
            } else if let Some(failure) = d["failure"].as_str() {
                println!("deployment {name}: ROLLOUT FAILED, canaries rolled back: {failure}");
            }
        }
        let online = gateways.iter().filter(|g| g.online).count();
        println!(
            "{} gateway(s), {online} online; {drift} pipeline(s) not running their desired version",
            gateways.len()
        );
        Ok(ExitCode::SUCCESS)
    })
}

fn gateway_state(g: &GatewayView) -> &'static str {
    match (g.revoked, g.enrolled, g.online) {
        (true, _, _) => "revoked",
        (false, false, _) => "pending",
        (false, true, true) => "online",
        (false, true, false) => "offline",
    }
}

fn ago(at_ms: Option<u64>) -> String {
    let Some(at_ms) = at_ms else {
        return "never".into();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let seconds = now.saturating_sub(at_ms) / 1000;
    match seconds {
        0..=1 => "now".into(),
        2..=119 => format!("{seconds}s ago"),
        120..=7199 => format!("{}m ago", seconds / 60),
        _ => format!("{}h ago", seconds / 3600),
    }
}

fn timestamp(at_ms: Option<u64>) -> String {
    let at_ms = at_ms.unwrap_or(0) as i64;
    chrono::DateTime::from_timestamp_millis(at_ms)
        .map_or("?".into(), |t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
}

fn parse_labels(items: &[String]) -> anyhow::Result<serde_json::Map<String, Value>> {
    let mut labels = serde_json::Map::new();
    for item in items {
        let Some((key, value)) = item.split_once('=') else {
            bail!("label '{item}' must be written key=value, e.g. site=plant1");
        };
        labels.insert(key.to_owned(), json!(value));
    }
    Ok(labels)
}

fn labels_text(labels: &Value) -> String {
    let text: Vec<String> = labels
        .as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("?")))
        .collect();
    if text.is_empty() {
        "no labels".into()
    } else {
        text.join(",")
    }
}

/// Calls the cloud API; an error answer becomes an error with the API's message (for bad
/// SQL: every `FILE:LINE:COL: error: ...` line).
async fn call(
    client: &CloudClientArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let response = request(client, method, path, body).await?;
    let status = response.status();
    if status == reqwest::StatusCode::NO_CONTENT {
        return Ok(Value::Null);
    }
    response
        .json()
        .await
        .with_context(|| format!("the cloud answered {status} without JSON"))
}

/// Sends one API request; an error answer becomes an error with the API's message.
async fn request(
    client: &CloudClientArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<reqwest::Response> {
    let http = crate::http::client_builder(client.ca.as_deref())?
        .build()
        .context("HTTP client")?;
    let url = format!("{}{path}", client.cloud.trim_end_matches('/'));
    let mut request = http.request(method, &url);
    if let Some(token) = &client.token {
        request = request.bearer_auth(token.trim());
    }
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.map_err(|error| {
        let mut message = format!("cannot reach the cloud at {}: {error}", client.cloud);
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        anyhow::anyhow!(message)
    })?;
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    {
        let body: Value = response
            .json()
            .await
            .with_context(|| format!("the cloud answered {status} without JSON"))?;
        let message = body["error"].as_str().unwrap_or("no message");
        if status == reqwest::StatusCode::UNAUTHORIZED && client.token.is_none() {
            bail!(
                "{message}\nhint: export WEIR_TOKEN=$(cat weir-cloud/admin.token), or pass --token"
            );
        }
        bail!("{message}");
    }
}
