//! `weir top`: a live terminal view of one gateway's pipelines, read from its local admin API.
//!
//! ```text
//!  GET {gateway}/api/pipelines ──► GatewayStatus ─┐
//!        every --interval            previous ────┼─► pipelines_screen() ─► Screen ─┬─► draw()        (live view)
//!                                    elapsed ─────┘                                 └─► render_text() (--once)
//! ```
//!
//! Everything from the decoded answer to the cells on screen is pure, so it is tested without a
//! terminal or a gateway; only [`run`] owns the terminal, the key reader and the poll loop.
//! Rates are counter deltas between two polls; a counter that cannot be compared with the one
//! before (first poll, a replaced pipeline, a restarted gateway) shows `-` rather than a guess.

use std::io;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use crossterm::event::{self, Event, KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use ratatui::DefaultTerminal;
use ratatui::layout::{Constraint, Layout};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::Line;
use ratatui::widgets::{Cell, Paragraph, Row, Table, Wrap};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};

const DEFAULT_GATEWAY: &str = "http://127.0.0.1:9464";
/// Longer than any healthy answer on a local network, short enough that a dead gateway shows up
/// as one within a few seconds instead of a frozen screen.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the key reader looks up from the terminal to see whether the view has ended.
const INPUT_POLL: Duration = Duration::from_millis(100);
/// At most this many error lines under the table, so the table always keeps the screen.
const MAX_NOTE_LINES: usize = 5;

#[derive(clap::Args)]
pub struct TopArgs {
    /// Base URL of the gateway's admin API (plain HTTP).
    #[arg(long, env = "WEIR_GATEWAY", default_value = DEFAULT_GATEWAY)]
    gateway: String,
    /// Seconds between two polls of the gateway; rates are averaged over this span.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Bearer token for the admin API, when the gateway requires one.
    #[arg(long, env = "WEIR_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print one plain-text frame to stdout and exit, instead of the live view. Rates need two
    /// polls, so they show "-"; the exit code is 1 when the gateway cannot be read.
    #[arg(long)]
    once: bool,
}

impl TopArgs {
    /// Checks the flags and returns the poll interval.
    fn validate(&self) -> anyhow::Result<Duration> {
        if !(self.interval.is_finite() && self.interval >= 0.1) {
            bail!(
                "--interval must be a number of seconds of at least 0.1, got {}",
                self.interval
            );
        }
        if !self.gateway.starts_with("http://") {
            bail!(
                "--gateway must be an http:// URL such as {DEFAULT_GATEWAY} (the admin API is \
                 plain HTTP), got {:?}",
                self.gateway
            );
        }
        Ok(Duration::from_secs_f64(self.interval))
    }
}

/// Runs `weir top`: the live view until q, Esc or Ctrl-C, or one text frame with `--once`.
pub async fn run(args: TopArgs) -> anyhow::Result<()> {
    let interval = args.validate()?;
    // An empty WEIR_ADMIN_TOKEN means "no token", not "send an empty one".
    let token = args.token.filter(|token| !token.is_empty());
    let client = AdminClient::new(&args.gateway, token)?;
    if args.once {
        print!("{}", once(&client).await?);
        return Ok(());
    }
    live(&client, interval).await
}

/// One frame as text: what `--once` prints.
async fn once(client: &AdminClient) -> anyhow::Result<String> {
    let status = client
        .fetch()
        .await
        .map_err(|error| anyhow::anyhow!(error.message(&client.gateway)))?;
    let screen = pipelines_screen(None, &status, Duration::ZERO, SystemTime::now());
    Ok(render_text(&screen))
}

async fn live(client: &AdminClient, interval: Duration) -> anyhow::Result<()> {
    // Declared first so that it is dropped last, after the key reader has stopped. It restores
    // the terminal on a normal return and on `?`; ratatui's panic hook covers panics.
    let _restore = RestoreTerminal;
    let mut terminal = ratatui::try_init().context("cannot take over the terminal")?;
    let mut input = TerminalInput::start().context("cannot start reading the keyboard")?;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut previous: Option<(GatewayStatus, Instant)> = None;
    let mut screen = Screen {
        header: format!("weir top  {}", client.gateway),
        body: Body::Connecting,
    };
    terminal.draw(|frame| draw(frame, &screen))?;
    loop {
        tokio::select! {
            quit = input.until_quit(&mut terminal, &screen) => return quit,
            _ = ticker.tick() => {}
        }
        // Keys are read while the request is in flight, so quitting never waits for a timeout.
        let fetched = tokio::select! {
            quit = input.until_quit(&mut terminal, &screen) => return quit,
            fetched = client.fetch() => fetched,
        };
        let now = Instant::now();
        screen = match fetched {
            Ok(current) => {
                let elapsed = previous
                    .as_ref()
                    .map_or(Duration::ZERO, |(_, at)| now.duration_since(*at));
                let screen = pipelines_screen(
                    previous.as_ref().map(|(status, _)| status),
                    &current,
                    elapsed,
                    SystemTime::now(),
                );
                previous = Some((current, now));
                screen
            }
            Err(error) => problem_screen(&client.gateway, &error, SystemTime::now()),
        };
        terminal.draw(|frame| draw(frame, &screen))?;
    }
}

struct RestoreTerminal;

impl Drop for RestoreTerminal {
    fn drop(&mut self) {
        ratatui::restore();
    }
}

/// Terminal events, read on a thread of their own because crossterm's reads block. Dropping it
/// stops and joins that thread.
struct TerminalInput {
    events: mpsc::Receiver<io::Result<Event>>,
    reader: Option<JoinHandle<()>>,
}

impl TerminalInput {
    fn start() -> io::Result<Self> {
        let (sender, events) = mpsc::channel(16);
        let reader = std::thread::Builder::new()
            .name("weir-top-keys".into())
            .spawn(move || read_events(&sender))?;
        Ok(Self {
            events,
            reader: Some(reader),
        })
    }

    /// Redraws `screen` on resize and returns `Ok` once a quit key is pressed. Cancel-safe: no
    /// event is lost when another branch of a `select!` wins.
    async fn until_quit(
        &mut self,
        terminal: &mut DefaultTerminal,
        screen: &Screen,
    ) -> anyhow::Result<()> {
        loop {
            match self.events.recv().await {
                Some(Ok(Event::Key(key))) if is_quit(key) => return Ok(()),
                Some(Ok(Event::Resize(..))) => {
                    terminal.draw(|frame| draw(frame, screen))?;
                }
                Some(Ok(_)) => {}
                Some(Err(error)) => return Err(error).context("cannot read from the terminal"),
                None => bail!("the keyboard reader stopped"),
            }
        }
    }
}

impl Drop for TerminalInput {
    fn drop(&mut self) {
        self.events.close();
        if let Some(reader) = self.reader.take() {
            // A reader that panicked has nothing left to clean up.
            let _ = reader.join();
        }
    }
}

fn read_events(sender: &mpsc::Sender<io::Result<Event>>) {
    // A poll with a timeout rather than a bare blocking read lets the thread see that the view
    // has ended and return.
    while !sender.is_closed() {
        let event = match event::poll(INPUT_POLL) {
            Ok(false) => continue,
            Ok(true) => event::read(),
            Err(error) => Err(error),
        };
        let failed = event.is_err();
        if sender.blocking_send(event).is_err() || failed {
            return;
        }
    }
}

fn is_quit(key: KeyEvent) -> bool {
    key.kind == KeyEventKind::Press
        && match key.code {
            KeyCode::Char('q' | 'Q') | KeyCode::Esc => true,
            KeyCode::Char('c') => key.modifiers.contains(KeyModifiers::CONTROL),
            _ => false,
        }
}

// ---------------------------------------------------------------------------------------------
// The admin API, as far as `top` reads it.
// ---------------------------------------------------------------------------------------------

/// One answer of `GET /api/pipelines`. Only the fields the view shows are declared: serde skips
/// the others (`source`, `sink`, `watermark_to_emit`, ...), so the API can grow freely.
#[derive(Debug, Clone, Deserialize)]
struct GatewayStatus {
    gateway: GatewayInfo,
    pipelines: Vec<PipelineStatus>,
}

#[derive(Debug, Clone, Deserialize)]
struct GatewayInfo {
    name: String,
    uptime_s: f64,
    broker: String,
    /// Present when the gateway takes its pipelines from a cloud.
    #[serde(default)]
    cloud: Option<CloudInfo>,
}

#[derive(Debug, Clone, Deserialize)]
struct CloudInfo {
    connected: bool,
    #[serde(default)]
    rejected: Vec<String>,
}

impl CloudInfo {
    /// The header's word on the cloud link.
    fn summary(&self) -> String {
        match (self.connected, self.rejected.len()) {
            (false, _) => "  cloud NOT CONNECTED".to_owned(),
            (true, 0) => "  cloud connected".to_owned(),
            (true, n) => format!("  cloud connected, {n} plan(s) REFUSED"),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
struct PipelineStatus {
    name: String,
    version: u64,
    state: PipelineState,
    /// Why a pipeline failed or is restarting.
    #[serde(default)]
    error: Option<String>,
    rows_in: u64,
    rows_out: u64,
    late_rows: u64,
    invalid_rows: u64,
    errors: u64,
    dead_letters: u64,
    restarts: u64,
    source_to_sink: LatencySummary,
}

#[derive(Debug, Clone, Deserialize)]
struct LatencySummary {
    count: u64,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(from = "String")]
enum PipelineState {
    Starting,
    Running,
    Restarting,
    Finished,
    Failed,
    Stopped,
    /// A state added to the API after this build of weir: shown as sent, uncoloured.
    Other(String),
}

impl From<String> for PipelineState {
    fn from(state: String) -> Self {
        match state.as_str() {
            "starting" => Self::Starting,
            "running" => Self::Running,
            "restarting" => Self::Restarting,
            "finished" => Self::Finished,
            "failed" => Self::Failed,
            "stopped" => Self::Stopped,
            _ => Self::Other(state),
        }
    }
}

impl PipelineState {
    fn as_str(&self) -> &str {
        match self {
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Restarting => "restarting",
            Self::Finished => "finished",
            Self::Failed => "failed",
            Self::Stopped => "stopped",
            Self::Other(state) => state,
        }
    }

    fn color(&self) -> Option<Color> {
        match self {
            Self::Running => Some(Color::Green),
            Self::Restarting => Some(Color::Yellow),
            Self::Failed => Some(Color::Red),
            Self::Starting | Self::Finished | Self::Stopped | Self::Other(_) => None,
        }
    }
}

struct AdminClient {
    http: reqwest::Client,
    /// The base URL as the user gave it, for messages.
    gateway: String,
    endpoint: String,
    token: Option<String>,
}

impl AdminClient {
    fn new(gateway: &str, token: Option<String>) -> anyhow::Result<Self> {
        let http = crate::http::client_builder(None)?
            .timeout(REQUEST_TIMEOUT)
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self {
            http,
            gateway: gateway.to_owned(),
            endpoint: format!("{}/api/pipelines", gateway.trim_end_matches('/')),
            token,
        })
    }

    async fn fetch(&self) -> Result<GatewayStatus, FetchError> {
        let mut request = self.http.get(&self.endpoint);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request
            .send()
            .await
            .map_err(|error| FetchError::Unreachable(transport_reason(&error)))?;
        let status = response.status();
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(FetchError::Unauthorized {
                token_sent: self.token.is_some(),
            });
        }
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            let first_line: String = body
                .lines()
                .next()
                .unwrap_or("")
                .chars()
                .take(200)
                .collect();
            return Err(FetchError::Status(status.as_u16(), first_line));
        }
        let body = response
            .bytes()
            .await
            .map_err(|error| FetchError::Unreachable(transport_reason(&error)))?;
        serde_json::from_slice(&body).map_err(|error| FetchError::Unreadable(error.to_string()))
    }
}

/// Why the view has no fresh sample. Every case is worth retrying: gateways restart, and their
/// configuration (the token) can change under a running `top`.
#[derive(Debug)]
enum FetchError {
    /// No HTTP answer: connection refused, timeout, DNS, reset.
    Unreachable(String),
    /// HTTP 401.
    Unauthorized { token_sent: bool },
    /// Any other non-success status, with the first line of the body.
    Status(u16, String),
    /// An answer that is not the JSON this view reads: another server on the port, or a
    /// gateway of an incompatible version.
    Unreadable(String),
}

impl FetchError {
    fn message(&self, gateway: &str) -> String {
        match self {
            Self::Unreachable(reason) => format!("cannot reach gateway at {gateway}: {reason}"),
            Self::Unauthorized { token_sent: true } => format!(
                "gateway at {gateway} rejected the admin token (HTTP 401): check --token or \
                 WEIR_ADMIN_TOKEN against the gateway's configuration"
            ),
            Self::Unauthorized { token_sent: false } => format!(
                "gateway at {gateway} requires an admin token (HTTP 401): pass --token or set \
                 WEIR_ADMIN_TOKEN"
            ),
            Self::Status(code, body) if body.is_empty() => {
                format!("gateway at {gateway} answered HTTP {code} to GET /api/pipelines")
            }
            Self::Status(code, body) => {
                format!("gateway at {gateway} answered HTTP {code} to GET /api/pipelines: {body}")
            }
            Self::Unreadable(reason) => format!(
                "gateway at {gateway} sent an answer weir top cannot read ({reason}): is it a \
                 weir gateway of a matching version?"
            ),
        }
    }
}

/// reqwest's own message ("error sending request") says less than the bottom of its cause
/// chain, which is the OS's word for it: "Connection refused (os error 111)".
fn transport_reason(error: &reqwest::Error) -> String {
    if error.is_timeout() {
        return format!("no answer within {} s", REQUEST_TIMEOUT.as_secs());
    }
    let mut cause: &dyn std::error::Error = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}

// ---------------------------------------------------------------------------------------------
// From samples to a screen: pure.
// ---------------------------------------------------------------------------------------------

/// What one frame shows, independent of how it is drawn.
#[derive(Debug, Clone, PartialEq)]
struct Screen {
    header: String,
    body: Body,
}

#[derive(Debug, Clone, PartialEq)]
enum Body {
    /// Before the first answer or failure.
    Connecting,
    Pipelines(Vec<PipelineRow>),
    /// The whole message, ready to show.
    Problem(String),
}

/// One line of the table. Rates and latencies are `None` where there is nothing honest to show.
#[derive(Debug, Clone, PartialEq)]
struct PipelineRow {
    name: String,
    version: u64,
    state: PipelineState,
    error: Option<String>,
    in_rate: Option<f64>,
    out_rate: Option<f64>,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    late: u64,
    invalid: u64,
    dead_letters: u64,
    errors: u64,
    restarts: u64,
}

#[derive(Clone, Copy)]
enum Align {
    Left,
    Right,
}

const COLUMNS: [(&str, Align); 12] = [
    ("PIPELINE", Align::Left),
    ("VER", Align::Right),
    ("STATE", Align::Left),
    ("IN/s", Align::Right),
    ("OUT/s", Align::Right),
    ("P50 ms", Align::Right),
    ("P99 ms", Align::Right),
    ("LATE", Align::Right),
    ("INVALID", Align::Right),
    ("DEAD LTR", Align::Right),
    ("ERRORS", Align::Right),
    ("RESTARTS", Align::Right),
];
const STATE_COLUMN: usize = 2;

impl PipelineRow {
    fn cells(&self) -> [String; COLUMNS.len()] {
        [
            self.name.clone(),
            self.version.to_string(),
            self.state.as_str().to_owned(),
            format_rate(self.in_rate),
            format_rate(self.out_rate),
            format_ms(self.p50_ms),
            format_ms(self.p99_ms),
            self.late.to_string(),
            self.invalid.to_string(),
            self.dead_letters.to_string(),
            self.errors.to_string(),
            self.restarts.to_string(),
        ]
    }

    fn note(&self) -> Option<String> {
        let error = self.error.as_deref()?;
        Some(format!("{} {}: {error}", self.name, self.state.as_str()))
    }
}

fn pipeline_rows(
    previous: Option<&GatewayStatus>,
    current: &GatewayStatus,
    elapsed: Duration,
) -> Vec<PipelineRow> {
    // A restarted gateway starts every counter again; its uptime going backwards is the tell,
    // even where a new counter has already overtaken the old one.
    let previous = previous.filter(|before| before.gateway.uptime_s <= current.gateway.uptime_s);
    current
        .pipelines
        .iter()
        .map(|pipeline| {
            // A new version is a new pipeline with counters of its own.
            let before = previous.and_then(|status| {
                status
                    .pipelines
                    .iter()
                    .find(|p| p.name == pipeline.name && p.version == pipeline.version)
            });
            let latency = &pipeline.source_to_sink;
            let has_latency = latency.count > 0;
            PipelineRow {
                name: pipeline.name.clone(),
                version: pipeline.version,
                state: pipeline.state.clone(),
                error: pipeline.error.clone(),
                in_rate: rate(before.map(|b| b.rows_in), pipeline.rows_in, elapsed),
                out_rate: rate(before.map(|b| b.rows_out), pipeline.rows_out, elapsed),
                p50_ms: has_latency.then_some(latency.p50_ms),
                p99_ms: has_latency.then_some(latency.p99_ms),
                late: pipeline.late_rows,
                invalid: pipeline.invalid_rows,
                dead_letters: pipeline.dead_letters,
                errors: pipeline.errors,
                restarts: pipeline.restarts,
            }
        })
        .collect()
}

/// Rows per second between two readings of one counter; `None` without an earlier reading, or
/// when the counter went backwards (the pipeline was replaced and its counter started again).
fn rate(before: Option<u64>, now: u64, elapsed: Duration) -> Option<f64> {
    let before = before?;
    let seconds = elapsed.as_secs_f64();
    if now < before || seconds <= 0.0 {
        return None;
    }
    Some((now - before) as f64 / seconds)
}

fn pipelines_screen(
    previous: Option<&GatewayStatus>,
    current: &GatewayStatus,
    elapsed: Duration,
    now: SystemTime,
) -> Screen {
    let rows = pipeline_rows(previous, current, elapsed);
    let total_in = total(rows.iter().map(|row| row.in_rate));
    let total_out = total(rows.iter().map(|row| row.out_rate));
    let gateway = &current.gateway;
    Screen {
        header: format!(
            "{}  broker {}{}  up {}  in {} rows/s  out {} rows/s  {}",
            gateway.name,
            gateway.broker,
            gateway
                .cloud
                .as_ref()
                .map_or(String::new(), CloudInfo::summary),
            format_uptime(gateway.uptime_s),
            format_rate(total_in),
            format_rate(total_out),
            clock_utc(now),
        ),
        body: Body::Pipelines(rows),
    }
}

fn problem_screen(gateway: &str, error: &FetchError, now: SystemTime) -> Screen {
    Screen {
        header: format!("weir top  {gateway}  {}", clock_utc(now)),
        body: Body::Problem(format!("{} — retrying", error.message(gateway))),
    }
}

/// The sum of the rates that are known; `None` when none is.
fn total(rates: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    rates
        .flatten()
        .fold(None, |sum, rate| Some(sum.unwrap_or(0.0) + rate))
}

fn format_rate(rate: Option<f64>) -> String {
    match rate {
        None => "-".to_owned(),
        Some(r) if r < 10.0 => format!("{r:.1}"),
        Some(r) if r < 1_000.0 => format!("{r:.0}"),
        Some(r) if r < 1_000_000.0 => format!("{:.1}k", r / 1_000.0),
        Some(r) => format!("{:.2}M", r / 1_000_000.0),
    }
}

fn format_ms(ms: Option<f64>) -> String {
    match ms {
        None => "-".to_owned(),
        Some(ms) if ms < 1.0 => format!("{ms:.2}"),
        Some(ms) if ms < 100.0 => format!("{ms:.1}"),
        Some(ms) => format!("{ms:.0}"),
    }
}

fn format_uptime(seconds: f64) -> String {
    let s = if seconds.is_finite() && seconds > 0.0 {
        seconds as u64
    } else {
        0
    };
    if s < 60 {
        format!("{s}s")
    } else if s < 3_600 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else if s < 86_400 {
        format!("{}h{:02}m", s / 3_600, s / 60 % 60)
    } else {
        format!("{}d{:02}h", s / 86_400, s / 3_600 % 24)
    }
}

/// UTC, because the binary carries no time-zone database; gateways usually log in UTC too.
fn clock_utc(now: SystemTime) -> String {
    let seconds = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) % 86_400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        seconds / 3_600,
        seconds / 60 % 60,
        seconds % 60
    )
}

const CONNECTING: &str = "waiting for the gateway's first answer…";
const NO_PIPELINES: &str = "no pipelines on this gateway";

// ---------------------------------------------------------------------------------------------
// Drawing: the same screen as a ratatui frame or as plain text.
// ---------------------------------------------------------------------------------------------

fn render_text(screen: &Screen) -> String {
    let mut lines = vec![screen.header.clone(), String::new()];
    match &screen.body {
        Body::Connecting => lines.push(CONNECTING.to_owned()),
        Body::Problem(message) => lines.push(message.clone()),
        Body::Pipelines(rows) if rows.is_empty() => lines.push(NO_PIPELINES.to_owned()),
        Body::Pipelines(rows) => {
            let header = COLUMNS.map(|(title, _)| title.to_owned());
            let cells: Vec<_> = rows.iter().map(PipelineRow::cells).collect();
            let mut widths = [0; COLUMNS.len()];
            for row in std::iter::once(&header).chain(&cells) {
                for (width, cell) in widths.iter_mut().zip(row) {
                    *width = (*width).max(cell.chars().count());
                }
            }
            for row in std::iter::once(&header).chain(&cells) {
                let mut line = String::new();
                for (i, cell) in row.iter().enumerate() {
                    if i > 0 {
                        line.push(' ');
                    }
                    let width = widths[i];
                    match COLUMNS[i].1 {
                        Align::Left => line.push_str(&format!("{cell:<width$}")),
                        Align::Right => line.push_str(&format!("{cell:>width$}")),
                    }
                }
                lines.push(line.trim_end().to_owned());
            }
            let notes: Vec<_> = rows.iter().filter_map(PipelineRow::note).collect();
            if !notes.is_empty() {
                lines.push(String::new());
                lines.extend(notes);
            }
        }
    }
    let mut text = lines.join("\n");
    text.push('\n');
    text
}

fn draw(frame: &mut ratatui::Frame, screen: &Screen) {
    let notes: Vec<String> = match &screen.body {
        Body::Pipelines(rows) => rows.iter().filter_map(PipelineRow::note).collect(),
        Body::Connecting | Body::Problem(_) => Vec::new(),
    };
    let note_lines = notes.len().min(MAX_NOTE_LINES) as u16;
    let [header, body, notes_area, footer] = Layout::vertical([
        Constraint::Length(2),
        Constraint::Fill(1),
        Constraint::Length(note_lines),
        Constraint::Length(1),
    ])
    .areas(frame.area());
    frame.render_widget(
        Paragraph::new(screen.header.as_str()).style(Style::new().add_modifier(Modifier::BOLD)),
        header,
    );
    match &screen.body {
        Body::Connecting => frame.render_widget(Paragraph::new(CONNECTING), body),
        Body::Problem(message) => frame.render_widget(
            Paragraph::new(message.as_str())
                .style(Style::new().fg(Color::Red))
                .wrap(Wrap { trim: true }),
            body,
        ),
        Body::Pipelines(rows) if rows.is_empty() => {
            frame.render_widget(Paragraph::new(NO_PIPELINES), body);
        }
        Body::Pipelines(rows) => frame.render_widget(pipeline_table(rows), body),
    }
    let notes: Vec<Line> = notes.into_iter().map(Line::from).collect();
    frame.render_widget(
        Paragraph::new(notes).style(Style::new().fg(Color::Red)),
        notes_area,
    );
    frame.render_widget(
        Paragraph::new("q quit").style(Style::new().add_modifier(Modifier::DIM)),
        footer,
    );
}

fn pipeline_table(rows: &[PipelineRow]) -> Table<'static> {
    let cells: Vec<_> = rows.iter().map(PipelineRow::cells).collect();
    let widths: Vec<Constraint> = COLUMNS
        .iter()
        .enumerate()
        .map(|(i, (title, _))| {
            let widest = cells
                .iter()
                .map(|row| row[i].chars().count())
                .chain([title.chars().count()])
                .max()
                .unwrap_or(0);
            Constraint::Length(widest as u16)
        })
        .collect();
    let aligned = |text: String, i: usize| match COLUMNS[i].1 {
        Align::Left => Line::from(text),
        Align::Right => Line::from(text).right_aligned(),
    };
    let header = Row::new(
        COLUMNS
            .iter()
            .enumerate()
            .map(|(i, (title, _))| Cell::from(aligned((*title).to_owned(), i))),
    )
    .style(Style::new().add_modifier(Modifier::BOLD | Modifier::REVERSED));
    let body = rows.iter().zip(cells).map(|(row, cells)| {
        Row::new(cells.into_iter().enumerate().map(|(i, text)| {
            let cell = Cell::from(aligned(text, i));
            match row.state.color() {
                Some(color) if i == STATE_COLUMN => cell.style(Style::new().fg(color)),
                _ => cell,
            }
        }))
    });
    Table::new(body, widths).header(header).column_spacing(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ratatui::Terminal;
    use ratatui::backend::TestBackend;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A pipeline in the API's JSON shape, with the counters that matter to a test.
    fn pipeline(name: &str, version: u64, state: &str, rows_in: u64, rows_out: u64) -> String {
        format!(
            r#"{{"name": "{name}", "version": {version}, "state": "{state}",
                "source": "vibration", "sink": "rms_out",
                "rows_in": {rows_in}, "rows_out": {rows_out}, "late_rows": 4, "invalid_rows": 5,
                "errors": 6, "dead_letters": 7, "restarts": 8,
                "source_to_sink": {{"count": 10, "p50_ms": 1.2, "p99_ms": 3.4, "max_ms": 5.0}},
                "watermark_to_emit": {{"count": 10, "p50_ms": 0.3, "p99_ms": 0.9, "max_ms": 1.0}}}}"#
        )
    }

    fn status_json(uptime_s: f64, pipelines: &[String]) -> String {
        format!(
            r#"{{"gateway": {{"name": "plant1-gw", "uptime_s": {uptime_s},
                             "broker": "embedded 127.0.0.1:1883"}},
                "pipelines": [{}]}}"#,
            pipelines.join(",")
        )
    }

    fn status(uptime_s: f64, pipelines: &[String]) -> GatewayStatus {
        serde_json::from_str(&status_json(uptime_s, pipelines)).expect("test JSON is valid")
    }

    const TWO_SECONDS: Duration = Duration::from_secs(2);

    fn at(seconds_of_day: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(20_000 * 86_400 + seconds_of_day)
    }

    #[test]
    fn rates_are_counter_deltas_over_the_elapsed_time() {
        let before = status(10.0, &[pipeline("a", 1, "running", 1_000, 100)]);
        let now = status(12.0, &[pipeline("a", 1, "running", 5_000, 106)]);
        let rows = pipeline_rows(Some(&before), &now, TWO_SECONDS);
        assert_eq!(rows[0].in_rate, Some(2_000.0));
        assert_eq!(rows[0].out_rate, Some(3.0));
        let cells = &rows[0].cells();
        assert_eq!((cells[3].as_str(), cells[4].as_str()), ("2.0k", "3.0"));
    }

    #[test]
    fn first_sample_has_no_rates() {
        let now = status(12.0, &[pipeline("a", 1, "running", 5_000, 106)]);
        let rows = pipeline_rows(None, &now, Duration::ZERO);
        assert_eq!((rows[0].in_rate, rows[0].out_rate), (None, None));
        assert_eq!(&rows[0].cells()[3..5], ["-", "-"]);
    }

    #[test]
    fn counters_going_backwards_show_no_rate_rather_than_a_negative_one() {
        // The pipeline was replaced under the same name and version: its counters started over.
        let before = status(10.0, &[pipeline("a", 1, "running", 1_000_000, 900)]);
        let now = status(12.0, &[pipeline("a", 1, "running", 40, 2)]);
        let rows = pipeline_rows(Some(&before), &now, TWO_SECONDS);
        assert_eq!((rows[0].in_rate, rows[0].out_rate), (None, None));
        assert_eq!(&rows[0].cells()[3..5], ["-", "-"]);
    }

    #[test]
    fn a_new_version_is_not_compared_with_the_old_one() {
        let before = status(10.0, &[pipeline("a", 1, "running", 100, 10)]);
        let now = status(12.0, &[pipeline("a", 2, "running", 500, 50)]);
        let rows = pipeline_rows(Some(&before), &now, TWO_SECONDS);
        assert_eq!((rows[0].in_rate, rows[0].out_rate), (None, None));
    }

    #[test]
    fn a_restarted_gateway_is_not_compared_with_the_old_one() {
        let before = status(500.0, &[pipeline("a", 1, "running", 100, 10)]);
        let now = status(1.0, &[pipeline("a", 1, "running", 500, 50)]);
        let rows = pipeline_rows(Some(&before), &now, TWO_SECONDS);
        assert_eq!((rows[0].in_rate, rows[0].out_rate), (None, None));
    }

    #[test]
    fn rate_needs_a_positive_elapsed_time() {
        assert_eq!(rate(Some(10), 20, Duration::ZERO), None);
        assert_eq!(rate(Some(10), 20, Duration::from_millis(500)), Some(20.0));
        assert_eq!(rate(Some(10), 10, TWO_SECONDS), Some(0.0));
    }

    #[test]
    fn latency_without_samples_shows_a_dash() {
        let json = pipeline("a", 1, "starting", 0, 0).replace(r#""count": 10"#, r#""count": 0"#);
        let rows = pipeline_rows(None, &status(1.0, &[json]), Duration::ZERO);
        assert_eq!(&rows[0].cells()[5..7], ["-", "-"]);
    }

    #[test]
    fn header_names_gateway_broker_uptime_totals_and_time() {
        let before = status(
            3_700.0,
            &[
                pipeline("a", 1, "running", 1_000, 10),
                pipeline("b", 1, "running", 0, 0),
            ],
        );
        let now = status(
            3_702.0,
            &[
                pipeline("a", 1, "running", 3_000, 30),
                pipeline("b", 1, "running", 400, 20),
                pipeline("c", 1, "starting", 0, 0),
            ],
        );
        let screen = pipelines_screen(Some(&before), &now, TWO_SECONDS, at(13 * 3_600 + 62));
        assert_eq!(
            screen.header,
            "plant1-gw  broker embedded 127.0.0.1:1883  up 1h01m  in 1.2k rows/s  \
             out 20 rows/s  13:01:02 UTC"
        );
    }

    #[test]
    fn the_header_says_whether_the_cloud_is_reachable() {
        let mut status = status(62.0, &[]);
        status.gateway.cloud = Some(CloudInfo {
            connected: false,
            rejected: Vec::new(),
        });
        let screen = pipelines_screen(None, &status, TWO_SECONDS, at(0));
        assert!(
            screen
                .header
                .contains("broker embedded 127.0.0.1:1883  cloud NOT CONNECTED  up"),
            "{}",
            screen.header
        );
        status.gateway.cloud = Some(CloudInfo {
            connected: true,
            rejected: vec!["rms v3: the plan is not signed".into()],
        });
        let screen = pipelines_screen(None, &status, TWO_SECONDS, at(0));
        assert!(
            screen.header.contains("cloud connected, 1 plan(s) REFUSED"),
            "{}",
            screen.header
        );
    }

    #[test]
    fn once_frame_has_a_row_of_cells_per_pipeline() {
        let before = status(10.0, &[pipeline("vibration_rms", 3, "running", 1_000, 10)]);
        let now = status(
            12.0,
            &[
                pipeline("vibration_rms", 3, "running", 1_201_000, 1_010),
                pipeline("pressure_spikes", 1, "restarting", 77, 0),
            ],
        );
        let text = render_text(&pipelines_screen(Some(&before), &now, TWO_SECONDS, at(0)));
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(lines[0][0], "plant1-gw");
        let expected_rows = [
            vec![
                "PIPELINE", "VER", "STATE", "IN/s", "OUT/s", "P50", "ms", "P99", "ms", "LATE",
                "INVALID", "DEAD", "LTR", "ERRORS", "RESTARTS",
            ],
            vec![
                "vibration_rms",
                "3",
                "running",
                "600.0k",
                "500",
                "1.2",
                "3.4",
                "4",
                "5",
                "7",
                "6",
                "8",
            ],
            vec![
                "pressure_spikes",
                "1",
                "restarting",
                "-",
                "-",
                "1.2",
                "3.4",
                "4",
                "5",
                "7",
                "6",
                "8",
            ],
        ];
        assert_eq!(lines[2..5], expected_rows);
        assert_eq!(lines.len(), 5, "no footer or notes in this frame:\n{text}");
    }

    #[test]
    fn once_frame_columns_line_up() {
        let now = status(
            1.0,
            &[
                pipeline("a", 1, "running", 0, 0),
                pipeline("long_pipeline_name", 12, "failed", 0, 0),
            ],
        );
        let text = render_text(&pipelines_screen(None, &now, Duration::ZERO, at(0)));
        let table: Vec<&str> = text.lines().skip(2).collect();
        let state_at: Vec<Option<usize>> = table
            .iter()
            .zip(["STATE", "running", "failed"])
            .map(|(line, state)| line.find(state))
            .collect();
        assert_eq!(state_at[0], state_at[1]);
        assert_eq!(state_at[1], state_at[2]);
        assert!(
            table
                .iter()
                .all(|line| line.ends_with('8') || line.ends_with("RESTARTS")),
            "the last column is right-aligned:\n{text}"
        );
    }

    #[test]
    fn pipeline_errors_are_listed_under_the_table() {
        let failed = pipeline("a", 1, "failed", 0, 0).replace(
            r#""state": "failed","#,
            r#""state": "failed", "error": "topic closed","#,
        );
        let text = render_text(&pipelines_screen(
            None,
            &status(1.0, &[failed]),
            Duration::ZERO,
            at(0),
        ));
        assert_eq!(text.lines().last(), Some("a failed: topic closed"));
    }

    #[test]
    fn states_map_to_colours() {
        let colour = |state: &str| PipelineState::from(state.to_owned()).color();
        assert_eq!(colour("running"), Some(Color::Green));
        assert_eq!(colour("restarting"), Some(Color::Yellow));
        assert_eq!(colour("failed"), Some(Color::Red));
        for uncoloured in ["starting", "finished", "stopped", "draining"] {
            assert_eq!(colour(uncoloured), None, "{uncoloured}");
        }
    }

    #[test]
    fn an_unknown_state_is_shown_as_sent() {
        let rows = pipeline_rows(
            None,
            &status(1.0, &[pipeline("a", 1, "draining", 0, 0)]),
            Duration::ZERO,
        );
        assert_eq!(rows[0].state, PipelineState::Other("draining".to_owned()));
        assert_eq!(rows[0].cells()[STATE_COLUMN], "draining");
    }

    /// The drawn frame as lines of text, and the foreground colour of the first cell of `word`.
    fn draw_to_buffer(screen: &Screen, word: &str) -> (Vec<String>, Option<Color>) {
        let mut terminal = Terminal::new(TestBackend::new(110, 12)).expect("test backend");
        terminal
            .draw(|frame| draw(frame, screen))
            .expect("draw to a test backend");
        let buffer = terminal.backend().buffer();
        let lines: Vec<String> = (0..buffer.area.height)
            .map(|y| {
                (0..buffer.area.width)
                    .map(|x| buffer[(x, y)].symbol())
                    .collect()
            })
            .collect();
        let colour = lines.iter().enumerate().find_map(|(y, line)| {
            let x = line.find(word)?;
            Some(buffer[(x as u16, y as u16)].fg)
        });
        (lines, colour)
    }

    #[test]
    fn live_view_colours_the_state_and_shows_the_footer() {
        let now = status(
            1.0,
            &[
                pipeline("vibration_rms", 3, "running", 0, 0),
                pipeline("pressure", 1, "failed", 0, 0),
            ],
        );
        let screen = pipelines_screen(None, &now, Duration::ZERO, at(0));
        let (lines, running) = draw_to_buffer(&screen, "running");
        assert_eq!(running, Some(Color::Green));
        assert_eq!(draw_to_buffer(&screen, "failed").1, Some(Color::Red));
        assert!(lines[0].starts_with("plant1-gw  broker"), "{lines:#?}");
        assert!(
            lines
                .iter()
                .any(|l| l.contains("vibration_rms") && l.contains("3.4")),
            "{lines:#?}"
        );
        assert_eq!(lines.last().map(|l| l.trim_end()), Some("q quit"));
    }

    #[test]
    fn live_view_shows_a_problem_in_place_of_the_table() {
        let error = FetchError::Unreachable("Connection refused (os error 111)".to_owned());
        let screen = problem_screen("http://gw.example:9464", &error, at(0));
        let (lines, colour) = draw_to_buffer(&screen, "cannot reach");
        assert_eq!(colour, Some(Color::Red));
        let text = lines.join("\n");
        assert!(
            text.contains(
                "cannot reach gateway at http://gw.example:9464: Connection refused (os error 111) \
                 — retrying"
            ),
            "{text}"
        );
    }

    #[test]
    fn quit_keys() {
        let key = |code, modifiers| KeyEvent::new(code, modifiers);
        assert!(is_quit(key(KeyCode::Char('q'), KeyModifiers::NONE)));
        assert!(is_quit(key(KeyCode::Esc, KeyModifiers::NONE)));
        assert!(is_quit(key(KeyCode::Char('c'), KeyModifiers::CONTROL)));
        assert!(!is_quit(key(KeyCode::Char('c'), KeyModifiers::NONE)));
        assert!(!is_quit(key(KeyCode::Char('x'), KeyModifiers::NONE)));
        let mut release = key(KeyCode::Char('q'), KeyModifiers::NONE);
        release.kind = KeyEventKind::Release;
        assert!(!is_quit(release));
    }

    #[test]
    fn args_have_the_documented_defaults_and_are_checked() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            top: TopArgs,
        }
        let parse = |args: &[&str]| {
            <Cli as clap::Parser>::try_parse_from(
                std::iter::once("top").chain(args.iter().copied()),
            )
            .map(|cli| cli.top)
        };
        let defaults = parse(&[]).expect("no flags is valid");
        if std::env::var_os("WEIR_GATEWAY").is_none() {
            assert_eq!(defaults.gateway, DEFAULT_GATEWAY);
        }
        assert_eq!(
            defaults.validate().expect("defaults are valid"),
            Duration::from_secs(1)
        );
        assert!(!defaults.once);

        let tuned = parse(&["--interval", "0.5", "--once", "--token", "s3cret"]).expect("valid");
        assert_eq!(tuned.validate().expect("valid"), Duration::from_millis(500));
        assert_eq!((tuned.once, tuned.token.as_deref()), (true, Some("s3cret")));

        for bad in [
            &["--interval", "0"][..],
            &["--interval", "NaN"][..],
            &["--gateway", "https://gw:9464"][..],
        ] {
            let args = parse(bad).expect("parses");
            assert!(args.validate().is_err(), "{bad:?} should be rejected");
        }
    }

    /// Serves one HTTP answer on loopback and hands back the request it got.
    async fn serve_once(
        status_line: &'static str,
        body: String,
    ) -> (String, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let url = format!("http://{}", listener.local_addr().expect("local address"));
        let server = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut request = Vec::new();
            let mut chunk = [0; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = stream.read(&mut chunk).await.expect("read request");
                assert!(n > 0, "client closed before sending a request");
                request.extend_from_slice(&chunk[..n]);
            }
            let response = format!(
                "HTTP/1.1 {status_line}\r\ncontent-type: application/json\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            stream
                .write_all(response.as_bytes())
                .await
                .expect("write response");
            String::from_utf8_lossy(&request).to_lowercase()
        });
        (url, server)
    }

    #[tokio::test]
    async fn once_reads_the_gateway_with_the_token_and_ignores_unknown_fields() {
        let json = status_json(
            12.5,
            &[pipeline("vibration_rms", 3, "running", 1_200_000, 1_000)],
        )
        .replace(r#""pipelines""#, r#""build": "0.2.0", "pipelines""#);
        let (url, server) = serve_once("200 OK", json).await;
        let client =
            AdminClient::new(&format!("{url}/"), Some("s3cret".to_owned())).expect("client");
        let text = once(&client).await.expect("the gateway answered");
        let request = server.await.expect("server task");
        assert!(
            request.starts_with("get /api/pipelines http/1.1"),
            "{request}"
        );
        assert!(
            request.contains("authorization: bearer s3cret"),
            "{request}"
        );
        assert!(
            text.starts_with("plant1-gw  broker embedded 127.0.0.1:1883  up 12s"),
            "{text}"
        );
        let row: Vec<&str> = text
            .lines()
            .nth(3)
            .expect("a pipeline row")
            .split_whitespace()
            .collect();
        assert_eq!(row[..5], ["vibration_rms", "3", "running", "-", "-"]);
    }

    #[tokio::test]
    async fn unreachable_gateway_gives_a_clear_message() {
        // A port that was just free and is closed now: connecting is refused.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let url = format!("http://{}", listener.local_addr().expect("local address"));
        drop(listener);
        let client = AdminClient::new(&url, None).expect("client");
        let error = client.fetch().await.expect_err("nothing listens there");
        let screen = problem_screen(&url, &error, at(0));
        let Body::Problem(message) = &screen.body else {
            panic!("expected a problem, got {screen:?}")
        };
        let prefix = format!("cannot reach gateway at {url}: ");
        assert!(message.starts_with(&prefix), "{message}");
        assert!(message.ends_with(" — retrying"), "{message}");
        assert!(message.to_lowercase().contains("refused"), "{message}");
        // --once says the same, without promising a retry.
        let once_error = once(&client)
            .await
            .expect_err("nothing listens there")
            .to_string();
        assert!(
            once_error.starts_with(&prefix) && !once_error.contains("retrying"),
            "{once_error}"
        );
    }

    #[tokio::test]
    async fn http_401_points_at_the_token() {
        let (url, server) = serve_once("401 Unauthorized", String::new()).await;
        let error = AdminClient::new(&url, None)
            .expect("client")
            .fetch()
            .await
            .expect_err("401");
        server.await.expect("server task");
        let message = error.message(&url);
        assert!(
            message.contains("requires an admin token (HTTP 401)"),
            "{message}"
        );
        assert!(
            message.contains("--token") && message.contains("WEIR_ADMIN_TOKEN"),
            "{message}"
        );

        let (url, server) = serve_once("401 Unauthorized", String::new()).await;
        let client = AdminClient::new(&url, Some("stale".to_owned())).expect("client");
        let error = client.fetch().await.expect_err("401");
        server.await.expect("server task");
        assert!(
            error
                .message(&url)
                .contains("rejected the admin token (HTTP 401)"),
            "{error:?}"
        );
    }

    #[tokio::test]
    async fn an_answer_that_is_not_the_api_says_so() {
        let (url, server) = serve_once("200 OK", "<html>router login</html>".to_owned()).await;
        let error = AdminClient::new(&url, None)
            .expect("client")
            .fetch()
            .await
            .expect_err("html");
        server.await.expect("server task");
        assert!(matches!(error, FetchError::Unreadable(_)), "{error:?}");

        let (url, server) =
            serve_once("503 Service Unavailable", "engine starting".to_owned()).await;
        let error = AdminClient::new(&url, None)
            .expect("client")
            .fetch()
            .await
            .expect_err("503");
        server.await.expect("server task");
        assert_eq!(
            error.message(&url),
            format!("gateway at {url} answered HTTP 503 to GET /api/pipelines: engine starting")
        );
    }
}
