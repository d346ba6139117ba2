//! `weir gateway`, `weir config check` and `weir pipelines`: the site process and the CLI
//! for its admin API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use weir_gateway::{Gateway, GatewayConfig, Overrides};

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// TOML configuration file (see `weir config check --help` for the layering).
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// `embedded` (run a broker inside the gateway), `none`, or the site's broker as
    /// `mqtt://host:port` / `mqtts://host:port`.
    #[arg(long)]
    pub broker: Option<String>,
    /// Address of the admin API (default 127.0.0.1:9464).
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// Start the pipelines of every .sql file in this directory.
    #[arg(long)]
    pub pipelines: Option<PathBuf>,
    /// This gateway's name (default: the host name).
    #[arg(long)]
    pub name: Option<String>,
    /// Take pipelines from this Weir cloud, e.g. http://cloud.example:8470 (the gateway
    /// dials out; the site needs no inbound port).
    #[arg(long, value_name = "URL")]
    pub cloud: Option<String>,
    /// The certificate authority of an https:// cloud (its tls/ca.pem); needed at
    /// enrollment, kept in the data directory after it.
    #[arg(long, value_name = "FILE")]
    pub cloud_ca: Option<PathBuf>,
    /// A one-time enrollment token from `weir cloud gateways add`; needed on the first start.
    #[arg(
        long,
        value_name = "TOKEN",
        env = "WEIR_ENROLL_TOKEN",
        hide_env_values = true
    )]
    pub enroll: Option<String>,
    /// Where the gateway keeps its cloud credential and last plans (default ./weir-gateway).
    #[arg(long, value_name = "DIR")]
    pub data: Option<PathBuf>,
}

impl GatewayArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            broker: self.broker.clone(),
            admin: self.admin,
            pipelines_dir: self.pipelines.clone(),
            name: self.name.clone(),
            data_dir: self.data.clone(),
            cloud: self.cloud.clone(),
            cloud_ca: self.cloud_ca.clone(),
        }
    }
}

pub(crate) fn runtime() -> actix_rt::SystemRunner {
    actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime can be built")
    })
}

pub fn gateway(args: GatewayArgs) -> anyhow::Result<ExitCode> {
    let config = GatewayConfig::load(args.config.as_deref(), &args.overrides())?;
    let enroll = args.enroll.clone();
    runtime().block_on(async move {
        let gateway = Gateway::start_enrolling(config, enroll).await?;
        let pipelines = gateway.deployments().list().len();
        let cloud = gateway
            .config()
            .cloud
            .url
            .as_deref()
            .map_or(String::new(), |url| format!(", cloud {url}"));
        eprintln!(
            "weir gateway '{}' running: broker {}, admin API http://{}{cloud}, {pipelines} \
             pipeline(s). Ctrl-C to stop.",
            gateway.config().name,
            gateway.broker_url().unwrap_or("none"),
            gateway.admin_address(),
        );
        weir_gateway::shutdown_signal().await;
        eprintln!("stopping: draining in-flight batches to the sinks...");
        if gateway.shutdown().await {
            eprintln!("stopped");
            Ok(ExitCode::SUCCESS)
        } else {
            eprintln!("stopped before every pipeline drained (shutdown_timeout)");
            Ok(ExitCode::FAILURE)
        }
    })
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a gateway configuration file; with --print, show the effective settings.
    #[command(after_help = "Examples:\n  \
        weir config check weir.toml\n  \
        WEIR__ADMIN__LISTEN=127.0.0.1:9500 weir config check weir.toml --print\n\n\
        Settings are layered: built-in defaults, then the TOML file, then environment\n\
        variables WEIR__SECTION__KEY (e.g. WEIR__BROKER__MODE=external), then the flags of\n\
        `weir gateway`. Unknown keys are errors, reported with the key and where it was set.")]
    Check {
        /// The TOML file.
        file: PathBuf,
        /// Print the effective configuration as TOML.
        #[arg(long)]
        print: bool,
    },
}

pub fn config(command: ConfigCommand) -> anyhow::Result<ExitCode> {
    match command {
        ConfigCommand::Check { file, print } => {
            match GatewayConfig::load(Some(&file), &Overrides::default()) {
                Ok(config) => {
                    if print {
                        print!("{}", config.to_toml());
                    }
                    eprintln!("{}: ok", file.display());
                    Ok(ExitCode::SUCCESS)
                }
                Err(error) => {
                    eprintln!("{}: {error}", file.display());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

#[derive(Debug, Args)]
pub struct AdminClientArgs {
    /// The gateway's admin API.
    #[arg(long, env = "WEIR_GATEWAY", default_value = "http://127.0.0.1:9464")]
    pub gateway: String,
    /// Bearer token, when the gateway requires one.
    #[arg(long, env = "WEIR_ADMIN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum PipelinesCommand {
    /// List the pipelines with their state and counters.
    List {
        #[command(flatten)]
        client: AdminClientArgs,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start the pipelines of a SQL file; fails if one of them is already deployed, or has a
    /// checkpoint (of an earlier version) this SQL cannot restore, unless --fresh.
    Add {
        file: PathBuf,
        /// Start even without the state of a checkpoint this SQL cannot restore.
        #[arg(long)]
        fresh: bool,
        #[command(flatten)]
        client: AdminClientArgs,
    },
    /// Deploy a SQL file as a new version of pipeline NAME (created if absent). Open windows
    /// carry over when the source and the stateful operators are unchanged; a version that
    /// would lose them is refused unless --fresh.
    Replace {
        name: String,
        file: PathBuf,
        /// Replace even if the new version cannot take over the running version's state (a
        /// changed window, aggregate, detector or source): its open windows start empty.
        /// Without it, such a replacement is refused and the running version stays.
        #[arg(long)]
        fresh: bool,
        #[command(flatten)]
        client: AdminClientArgs,
    },
    /// Stop a pipeline (in-flight batches reach the sink first) and remove it.
    Rm {
        name: String,
        #[command(flatten)]
        client: AdminClientArgs,
    },
}

pub fn pipelines(command: PipelinesCommand) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("tokio runtime")?;
    runtime.block_on(async move {
        let http = crate::http::client_builder(None)?
            .build()
            .context("HTTP client")?;
        match command {
            PipelinesCommand::List { client, json } => {
                let body =
                    call(&http, &client, reqwest::Method::GET, "/api/pipelines", None).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&body)?);
                } else {
                    print_list(&body);
                }
                Ok(ExitCode::SUCCESS)
            }
            PipelinesCommand::Add {
                file,
                fresh,
                client,
            } => {
                let (sql, label) = read_sql(&file)?;
                let path = format!("/api/pipelines?file={}&fresh={fresh}", encode(&label));
                let body = call(&http, &client, reqwest::Method::POST, &path, Some(sql)).await?;
                print_deployed(&body);
                Ok(ExitCode::SUCCESS)
            }
            PipelinesCommand::Replace {
                name,
                file,
                fresh,
                client,
            } => {
                let (sql, label) = read_sql(&file)?;
                let path = format!(
                    "/api/pipelines/{}?file={}&fresh={fresh}",
                    encode(&name),
                    encode(&label)
                );
                let body = call(&http, &client, reqwest::Method::PUT, &path, Some(sql)).await?;
                print_deployed(&body);
                Ok(ExitCode::SUCCESS)
            }
            PipelinesCommand::Rm { name, client } => {
                let path = format!("/api/pipelines/{}", encode(&name));
                call(&http, &client, reqwest::Method::DELETE, &path, None).await?;
                println!("removed {name}");
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

fn read_sql(file: &std::path::Path) -> anyhow::Result<(String, String)> {
    let sql =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    Ok((sql, file.display().to_string()))
}

/// Percent-encodes a query or path value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Calls the admin API; an error response becomes an error carrying the API's message
/// (for bad SQL: every `FILE:LINE:COL: error: ...` line).
async fn call(
    http: &reqwest::Client,
    client: &AdminClientArgs,
    method: reqwest::Method,
    path: &str,
    body: Option<String>,
) -> anyhow::Result<serde_json::Value> {
    let url = format!("{}{path}", client.gateway.trim_end_matches('/'));
    let mut request = http.request(method, &url);
    if let Some(token) = &client.token {
        request = request.bearer_auth(token);
    }
    if let Some(body) = body {
        request = request
            .header(reqwest::header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(body);
    }
    let response = request
        .send()
        .await
        .with_context(|| format!("cannot reach the gateway at {}", client.gateway))?;
    let status = response.status();
    let body: serde_json::Value = response
        .json()
        .await
        .with_context(|| format!("the gateway answered {status} without JSON"))?;
    if !status.is_success() {
        let message = body["error"].as_str().unwrap_or("no message");
        bail!("{message}");
    }
    Ok(body)
}

fn print_deployed(body: &serde_json::Value) {
    for deployed in body["deployed"].as_array().into_iter().flatten() {
        let name = deployed["name"].as_str().unwrap_or("?");
        let version = deployed["version"].as_u64().unwrap_or(0);
        let state = match (deployed["state"].as_str(), deployed["reason"].as_str()) {
            (Some("kept"), _) => "state kept: open windows carry on".to_owned(),
            (Some("fresh"), Some(reason)) => format!("state reset: {reason}"),
            _ => "new".to_owned(),
        };
        println!("deployed {name} v{version} ({state})");
    }
}

fn print_list(body: &serde_json::Value) {
    let gateway = &body["gateway"];
    println!(
        "gateway {} · broker {} · up {:.0}s",
        gateway["name"].as_str().unwrap_or("?"),
        gateway["broker"].as_str().unwrap_or("?"),
        gateway["uptime_s"].as_f64().unwrap_or(0.0)
    );
    let cloud = &gateway["cloud"];
    if let Some(url) = cloud["url"].as_str() {
        let state = if cloud["connected"] == true {
            format!("connected as {}", cloud["gateway"].as_str().unwrap_or("?"))
        } else {
            format!(
                "not connected: {}",
                cloud["last_error"].as_str().unwrap_or("connecting")
            )
        };
        println!("cloud {url} · {state}");
        for rejected in cloud["rejected"].as_array().into_iter().flatten() {
            println!("  refused: {}", rejected.as_str().unwrap_or("?"));
        }
    }
    println!(
        "{:<24} {:>4} {:<11} {:>12} {:>10} {:>8} {:>8} {:>9}",
        "PIPELINE", "VER", "STATE", "ROWS IN", "ROWS OUT", "LATE", "ERRORS", "DEAD LTR"
    );
    for p in body["pipelines"].as_array().into_iter().flatten() {
        let n = |key: &str| p[key].as_u64().unwrap_or(0);
        println!(
            "{:<24} {:>4} {:<11} {:>12} {:>10} {:>8} {:>8} {:>9}",
            p["name"].as_str().unwrap_or("?"),
            n("version"),
            p["state"].as_str().unwrap_or("?"),
            n("rows_in"),
            n("rows_out"),
            n("late_rows"),
            n("errors"),
            n("dead_letters"),
        );
        if let Some(error) = p["error"].as_str() {
            println!("    {error}");
        }
    }
}
