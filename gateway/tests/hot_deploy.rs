//! A real gateway (embedded broker, admin API over HTTP) changing pipelines while it runs.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::Value;
use weir_gateway::{Gateway, GatewayConfig, Overrides};

fn run<F: Future<Output = ()>>(test: F) {
    actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
    .block_on(test);
}

fn config(token: Option<&str>) -> GatewayConfig {
    let mut config = GatewayConfig::load(None, &Overrides::default()).expect("defaults");
    config.name = "test-gw".into();
    config.broker.embedded.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.admin.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.admin.token = token.map(str::to_owned);
    config.engine.idle_timeout = Duration::from_millis(200);
    // Checkpoints and the uplink live here; each test has its own.
    config.data_dir = tempfile::tempdir().expect("temp dir").keep();
    config
}

/// The admin API over HTTP.
struct Admin {
    base: String,
    http: reqwest::Client,
    token: Option<String>,
}

impl Admin {
    fn new(gateway: &Gateway, token: Option<&str>) -> Self {
        // reqwest builds on rustls without a provider of its own; `weir` installs ring.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Self {
            base: format!("http://{}", gateway.admin_address()),
            http: reqwest::Client::new(),
            token: token.map(str::to_owned),
        }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<&str>) -> (u16, Value) {
        let mut request = self.http.request(method, format!("{}{path}", self.base));
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request.body(body.to_owned());
        }
        let response = request.send().await.expect("admin API reachable");
        let status = response.status().as_u16();
        let text = response.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Adds pipelines from `sql`.
    async fn post(&self, path: &str, sql: &str) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, Some(sql)).await
    }

    /// Replaces a pipeline with `sql`.
    async fn put(&self, path: &str, sql: &str) -> (u16, Value) {
        self.call(reqwest::Method::PUT, path, Some(sql)).await
    }

    async fn pipelines(&self) -> BTreeMap<String, Value> {
        let (status, body) = self
            .call(reqwest::Method::GET, "/api/pipelines", None)
            .await;
        assert_eq!(status, 200, "{body}");
        body["pipelines"]
            .as_array()
            .expect("pipelines")
            .iter()
            .map(|p| (p["name"].as_str().expect("name").to_owned(), p.clone()))
            .collect()
    }
}

/// A subscriber collecting every JSON message on `filter`.
async fn subscribe(
    url: &str,
    filter: &str,
) -> (
    Arc<Mutex<Vec<(String, Value)>>>,
    tokio::task::JoinHandle<()>,
) {
    let address = url.trim_start_matches("mqtt://");
    let (host, port) = address.rsplit_once(':').expect("host:port");
    let options = MqttOptions::new(
        format!("test-sub-{:08x}", rand_id()),
        host,
        port.parse().expect("port"),
    );
    let (client, mut events) = AsyncClient::new(options, 10);
    client
        .subscribe(filter, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    loop {
        if let Event::Incoming(Packet::SubAck(_)) = events.poll().await.expect("connect") {
            break;
        }
    }
    let messages = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&messages);
    let task = tokio::spawn(async move {
        let _client = client;
        while let Ok(event) = events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                let row = serde_json::from_slice(&p.payload).expect("JSON result");
                sink.lock().expect("lock").push((p.topic.clone(), row));
            }
        }
    });
    (messages, task)
}

fn rand_id() -> u32 {
    use std::time::SystemTime;
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

/// A QoS 1 publisher; `send` returns once the broker acknowledged every message.
struct Publisher {
    client: AsyncClient,
    acks: tokio::sync::mpsc::UnboundedReceiver<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Publisher {
    async fn connect(url: &str) -> Self {
        let address = url.trim_start_matches("mqtt://");
        let (host, port) = address.rsplit_once(':').expect("host:port");
        let options = MqttOptions::new(
            format!("test-pub-{:08x}", rand_id()),
            host,
            port.parse().expect("port"),
        );
        let (client, mut events) = AsyncClient::new(options, 1000);
        let (ack, acks) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            while let Ok(event) = events.poll().await {
                if let Event::Incoming(Packet::PubAck(_)) = event {
                    let _ = ack.send(());
                }
            }
        });
        Self { client, acks, task }
    }

    async fn send(&mut self, messages: Vec<(String, String)>) {
        let count = messages.len();
        for (topic, payload) in messages {
            self.client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await
                .expect("publish");
        }
        for _ in 0..count {
            tokio::time::timeout(Duration::from_secs(20), self.acks.recv())
                .await
                .expect("broker acknowledges")
                .expect("publisher alive");
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the `mqtt` source `name` (`pipeline/source`) has subscribed.
async fn subscribed(name: &str) {
    let stats = weir_connectors::mqtt::MqttStats::named(name);
    wait_until(&format!("source {name} to subscribe"), || {
        stats
            .subscriptions
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    })
    .await;
}

const SEQUENCE_SQL: &str = "
CREATE SOURCE seq_in (sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, seq BIGINT NOT NULL)
WITH (connector = 'mqtt', topic = 'seq/{sensor}', qos = 1, linger = '2ms');
CREATE SINK seq_out WITH (connector = 'mqtt', topic = 'out/seq/{sensor}');
CREATE PIPELINE copy_seq AS INSERT INTO seq_out SELECT sensor, seq FROM seq_in;
";

/// A reading of sensor `a` at `ts` ms.
fn reading(ts: i64, v: f64) -> (String, String) {
    ("readings/a".to_owned(), format!(r#"{{"ts":{ts},"v":{v}}}"#))
}

/// Readings at 4 s and 5 s in the window [0 s, 10 s), then one at 12 s whose watermark
/// closes it; returns what the sink published once the first result is there.
async fn finish_the_first_window(
    publisher: &mut Publisher,
    out: &Arc<Mutex<Vec<(String, Value)>>>,
) -> Vec<(String, Value)> {
    publisher
        .send(vec![
            reading(4000, 4.0),
            reading(5000, 5.0),
            reading(12_000, 1.0),
        ])
        .await;
    wait_until("the first window's result", || {
        !out.lock().expect("lock").is_empty()
    })
    .await;
    out.lock().expect("lock").clone()
}

fn windowed_sql(threshold: f64, window: &str) -> String {
    format!(
        "
CREATE SOURCE readings (sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE,
                        WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
WITH (connector = 'mqtt', topic = 'readings/{{sensor}}', qos = 1, linger = '2ms');
CREATE SINK sums_out WITH (connector = 'mqtt', topic = 'out/sums/{{sensor}}');
CREATE PIPELINE sums AS INSERT INTO sums_out
SELECT sensor, window_start, count(*) AS n, sum(v) AS total
FROM TUMBLE(readings, ts, INTERVAL '{window}')
GROUP BY sensor, window_start
HAVING sum(v) > {threshold};
"
    )
}

#[test]
fn adding_replacing_and_removing_pipelines_loses_nothing_of_the_others() {
    run(async {
        let gateway = Gateway::start(config(None)).await.expect("gateway");
        let url = gateway.broker_url().expect("broker").to_owned();
        let admin = Admin::new(&gateway, None);
        let (status, body) = admin
            .post("/api/pipelines?file=seq.sql", SEQUENCE_SQL)
            .await;
        assert_eq!(status, 201, "{body}");
        let (out, _sub) = subscribe(&url, "out/seq/#").await;
        subscribed("copy_seq/seq_in").await;

        let mut publisher = Publisher::connect(&url).await;
        let total = 3000u64;
        let publishing = tokio::spawn(async move {
            for chunk in 0..30u64 {
                let messages = (chunk * 100..(chunk + 1) * 100)
                    .map(|seq| {
                        (
                            format!("seq/s{}", seq % 3),
                            format!(r#"{{"ts":{seq},"seq":{seq}}}"#),
                        )
                    })
                    .collect();
                publisher.send(messages).await;
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        });

        // Meanwhile: add, replace (compatible), replace (incompatible), remove.
        let (status, body) = admin
            .post(
                "/api/pipelines?file=sums.sql",
                &windowed_sql(0.0, "10 SECONDS"),
            )
            .await;
        assert_eq!(status, 201, "{body}");
        let (status, body) = admin
            .put(
                "/api/pipelines/sums?file=sums.sql",
                &windowed_sql(5.0, "10 SECONDS"),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["deployed"][0]["state"], "kept", "{body}");
        assert_eq!(body["deployed"][0]["version"], 2);
        let (status, body) = admin
            .put(
                "/api/pipelines/sums?file=sums.sql",
                &windowed_sql(5.0, "20 SECONDS"),
            )
            .await;
        assert_eq!(
            status, 409,
            "a longer window would lose the open ones: {body}"
        );
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("'sums'") && error.contains("fresh"),
            "{body}"
        );
        let (status, body) = admin
            .call(reqwest::Method::GET, "/api/pipelines/sums", None)
            .await;
        assert_eq!((status, &body["version"]), (200, &2.into()), "{body}");
        let (status, body) = admin
            .put(
                "/api/pipelines/sums?file=sums.sql&fresh=true",
                &windowed_sql(5.0, "20 SECONDS"),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["deployed"][0]["state"], "fresh", "{body}");
        assert!(
            body["deployed"][0]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("changed")),
            "{body}"
        );
        let (status, body) = admin
            .call(reqwest::Method::DELETE, "/api/pipelines/sums", None)
            .await;
        assert_eq!(status, 200, "{body}");
        let (status, _) = admin
            .call(reqwest::Method::DELETE, "/api/pipelines/sums", None)
            .await;
        assert_eq!(status, 404);

        publishing.await.expect("publisher");
        // Once the sink has written `total` rows and the subscriber has them all, a duplicate
        // would show in either count.
        let deployments = gateway.deployments().clone();
        wait_until("every sequence number", || {
            out.lock().expect("lock").len() as u64 >= total
                && deployments.list().iter().any(|p| p.rows_out >= total)
        })
        .await;
        let written = deployments.list()[0].rows_out;
        assert_eq!(written, total, "the pipeline wrote each message once");
        let mut seqs: Vec<u64> = out
            .lock()
            .expect("lock")
            .iter()
            .map(|(_, row)| row["seq"].as_u64().expect("seq"))
            .collect();
        seqs.sort_unstable();
        assert_eq!(seqs, (0..total).collect::<Vec<_>>(), "no gap, no duplicate");
        let pipelines = admin.pipelines().await;
        assert_eq!(pipelines.keys().collect::<Vec<_>>(), ["copy_seq"]);
        assert_eq!(pipelines["copy_seq"]["version"], 1);
        assert_eq!(pipelines["copy_seq"]["restarts"], 0);
        assert!(gateway.shutdown().await, "drained within the timeout");
    });
}

#[test]
fn the_reading_that_closes_a_window_does_not_wait_out_the_linger() {
    run(async {
        let mut config = config(None);
        // Only the readings move event time here, never the wall clock.
        config.engine.idle_timeout = Duration::from_secs(600);
        let gateway = Gateway::start(config).await.expect("gateway");
        let url = gateway.broker_url().expect("broker").to_owned();
        let admin = Admin::new(&gateway, None);
        let sql = windowed_sql(0.0, "10 SECONDS").replace("linger = '2ms'", "linger = '10s'");
        let (status, body) = admin.post("/api/pipelines", &sql).await;
        assert_eq!(status, 201, "{body}");
        let (out, _sub) = subscribe(&url, "out/sums/#").await;
        subscribed("sums/readings").await;
        let mut publisher = Publisher::connect(&url).await;
        let sent = Instant::now();
        let results = finish_the_first_window(&mut publisher, &out).await;
        // The source batches for up to 10 s while it waits for more; the reading at 12 s
        // moves the watermark past the window's end, so its batch leaves at once. A result
        // later than the linger would mean it waited.
        assert!(
            sent.elapsed() < Duration::from_secs(9),
            "the window's result waited for the source's linger"
        );
        assert_eq!(results.len(), 1, "{results:?}");
        assert_eq!(results[0].1["n"], 2);
        assert_eq!(results[0].1["total"], 9.0);
        assert!(gateway.shutdown().await);
    });
}

#[test]
fn a_compatible_replacement_keeps_open_windows() {
    run(async {
        let gateway = Gateway::start(config(None)).await.expect("gateway");
        let url = gateway.broker_url().expect("broker").to_owned();
        let admin = Admin::new(&gateway, None);
        let (status, body) = admin
            .post("/api/pipelines", &windowed_sql(0.0, "10 SECONDS"))
            .await;
        assert_eq!(status, 201, "{body}");
        let (out, _sub) = subscribe(&url, "out/sums/#").await;
        let stats = weir_connectors::mqtt::MqttStats::named("sums/readings");
        let subscribed = |n: u64| {
            let stats = Arc::clone(&stats);
            move || {
                stats
                    .subscriptions
                    .load(std::sync::atomic::Ordering::Relaxed)
                    >= n
            }
        };
        wait_until("the source to subscribe", subscribed(1)).await;
        let mut publisher = Publisher::connect(&url).await;
        // Window [0 s, 10 s): three readings before the replacement...
        publisher
            .send(vec![
                reading(1000, 1.0),
                reading(2000, 2.0),
                reading(3000, 3.0),
            ])
            .await;
        let rows_in = |name: &'static str| {
            let gateway = gateway.deployments().clone();
            move || {
                gateway
                    .list()
                    .iter()
                    .find(|p| p.name == name)
                    .is_some_and(|p| p.stages[1].rows_in >= 3)
            }
        };
        wait_until("the readings to reach the window", rows_in("sums")).await;
        let (status, body) = admin
            .put("/api/pipelines/sums", &windowed_sql(5.0, "10 SECONDS"))
            .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["deployed"][0]["state"], "kept", "{body}");
        wait_until("the new version to subscribe", subscribed(2)).await;
        // ...two after, then one in the next window that moves the watermark past 10 s.
        let results = finish_the_first_window(&mut publisher, &out).await;
        assert_eq!(results.len(), 1, "{results:?}");
        assert_eq!(results[0].0, "out/sums/a");
        assert_eq!(
            results[0].1["n"], 5,
            "all five readings, across the replacement"
        );
        assert_eq!(results[0].1["total"], 15.0);
        assert!(gateway.shutdown().await);
    });
}

#[test]
fn after_a_restart_windows_resume_from_the_checkpoint_and_a_version_they_do_not_fit_needs_fresh() {
    run(async {
        let config = config(None);
        let windowed_after = |gateway: &Gateway, n: u64| {
            let deployments = gateway.deployments().clone();
            move || {
                deployments
                    .list()
                    .iter()
                    .find(|p| p.name == "sums")
                    .is_some_and(|p| p.stages[1].rows_in >= n)
            }
        };

        // Three readings of the window [0 s, 10 s), then a graceful stop: its last checkpoint.
        let gateway = Gateway::start(config.clone()).await.expect("gateway");
        let admin = Admin::new(&gateway, None);
        let (status, body) = admin
            .post("/api/pipelines", &windowed_sql(0.0, "10 SECONDS"))
            .await;
        assert_eq!(status, 201, "{body}");
        let mut publisher = Publisher::connect(gateway.broker_url().expect("broker")).await;
        let stats = weir_connectors::mqtt::MqttStats::named("sums/readings");
        let subscriptions = || {
            stats
                .subscriptions
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        wait_until("the source to subscribe", || subscriptions() >= 1).await;
        publisher
            .send(vec![
                reading(1000, 1.0),
                reading(2000, 2.0),
                reading(3000, 3.0),
            ])
            .await;
        wait_until(
            "the readings to reach the window",
            windowed_after(&gateway, 3),
        )
        .await;
        drop(publisher);
        assert!(gateway.shutdown().await);

        // A new filter threshold fits the checkpoint: the open window carries on.
        let gateway = Gateway::start(config.clone()).await.expect("gateway");
        let url = gateway.broker_url().expect("broker").to_owned();
        let admin = Admin::new(&gateway, None);
        let (status, body) = admin
            .post("/api/pipelines", &windowed_sql(5.0, "10 SECONDS"))
            .await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["deployed"][0]["state"], "new", "{body}");
        let (out, _sub) = subscribe(&url, "out/sums/#").await;
        let mut publisher = Publisher::connect(&url).await;
        wait_until("the source to subscribe again", || subscriptions() >= 2).await;
        let results = finish_the_first_window(&mut publisher, &out).await;
        assert_eq!(
            (&results[0].1["n"], &results[0].1["total"]),
            (&5.into(), &15.0.into()),
            "all five readings, across the restart: {results:?}"
        );
        drop(publisher);
        assert!(gateway.shutdown().await);

        // A longer window does not fit the checkpoint: refused, unless asked to start fresh.
        let gateway = Gateway::start(config).await.expect("gateway");
        let admin = Admin::new(&gateway, None);
        let longer = windowed_sql(5.0, "20 SECONDS");
        let (status, body) = admin.post("/api/pipelines", &longer).await;
        assert_eq!(status, 409, "{body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("'sums' has a checkpoint") && error.contains("--fresh"),
            "{body}"
        );
        assert!(admin.pipelines().await.is_empty(), "nothing started");
        let (status, body) = admin.post("/api/pipelines?fresh=true", &longer).await;
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["deployed"][0]["state"], "fresh", "{body}");
        assert!(
            body["deployed"][0]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("last checkpoint")),
            "{body}"
        );
        let listed = admin.pipelines().await;
        assert_eq!(
            listed["sums"]["state_handover"]["state"], "fresh",
            "{listed:?}"
        );
        assert!(gateway.shutdown().await);
    });
}

#[test]
fn bad_sql_is_refused_with_line_and_column_and_running_pipelines_carry_on() {
    run(async {
        let gateway = Gateway::start(config(None)).await.expect("gateway");
        let admin = Admin::new(&gateway, None);
        let (status, _) = admin.post("/api/pipelines", SEQUENCE_SQL).await;
        assert_eq!(status, 201);
        let bad = "CREATE SOURCE s (sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE)\n\
                   WITH (connector = 'mqtt', topic = 'x/{sensor}');\n\
                   CREATE SINK o WITH (connector = 'mqtt', topic = 'y');\n\
                   CREATE PIPELINE p AS INSERT INTO o SELECT sensr FROM s;\n";
        let (status, body) = admin.post("/api/pipelines?file=bad.sql", bad).await;
        assert_eq!(status, 400, "{body}");
        let error = body["error"].as_str().expect("message");
        assert!(error.starts_with("bad.sql:4:43: error:"), "{error}");
        assert!(error.contains("sensor"), "hint names the column: {error}");
        assert_eq!(body["diagnostics"][0]["line"], 4);
        assert_eq!(body["diagnostics"][0]["column"], 43);

        let (status, body) = admin.post("/api/pipelines", SEQUENCE_SQL).await;
        assert_eq!(status, 409, "adding it twice: {body}");
        let (status, body) = admin.put("/api/pipelines/other", SEQUENCE_SQL).await;
        assert_eq!(status, 400, "{body}");
        let (status, body) = admin
            .post("/api/pipelines", "CREATE SINK x WITH (connector = 'null');")
            .await;
        assert_eq!(status, 400, "{body}");

        let pipelines = admin.pipelines().await;
        assert_eq!(pipelines.len(), 1);
        assert_eq!(pipelines["copy_seq"]["state"], "running");
        assert_eq!(pipelines["copy_seq"]["version"], 1);
        assert!(gateway.shutdown().await);
    });
}

#[test]
fn metrics_health_and_the_token() {
    run(async {
        let gateway = Gateway::start(config(Some("s3cret")))
            .await
            .expect("gateway");
        let anonymous = Admin::new(&gateway, None);
        let (status, body) = anonymous.call(reqwest::Method::GET, "/health", None).await;
        assert_eq!(status, 200, "health needs no token");
        assert_eq!(body["status"], "ok");
        let (status, body) = anonymous
            .call(reqwest::Method::GET, "/api/pipelines", None)
            .await;
        assert_eq!(status, 401, "{body}");
        let (status, _) = anonymous.call(reqwest::Method::GET, "/metrics", None).await;
        assert_eq!(status, 401);

        let admin = Admin::new(&gateway, Some("s3cret"));
        let (status, _) = admin.post("/api/pipelines", SEQUENCE_SQL).await;
        assert_eq!(status, 201);
        let url = gateway.broker_url().expect("broker").to_owned();
        let stats = weir_connectors::mqtt::MqttStats::named("copy_seq/seq_in");
        wait_until("the source to subscribe", || {
            stats
                .subscriptions
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 1
        })
        .await;
        let mut publisher = Publisher::connect(&url).await;
        publisher
            .send(vec![
                ("seq/a".into(), r#"{"ts":1,"seq":1}"#.into()),
                ("seq/a".into(), "not json".into()),
            ])
            .await;
        let deployments = gateway.deployments().clone();
        wait_until("the row and the dead letter", || {
            deployments
                .list()
                .first()
                .is_some_and(|p| p.rows_out >= 1 && p.dead_letters >= 1)
        })
        .await;
        let (status, Value::String(text)) =
            admin.call(reqwest::Method::GET, "/metrics", None).await
        else {
            panic!("metrics are text")
        };
        assert_eq!(status, 200);
        for expected in [
            "weir_pipeline_rows_in_total{pipeline=\"copy_seq\"} 1",
            "weir_pipeline_rows_out_total{pipeline=\"copy_seq\"} 1",
            "weir_pipeline_running{pipeline=\"copy_seq\"} 1",
            "weir_dead_letters_total{pipeline=\"copy_seq\",reason=\"invalid json\"} 1",
            "weir_mqtt_connected{connector=\"copy_seq/seq_in\"} 1",
            "# EOF",
        ] {
            assert!(text.contains(expected), "missing {expected} in:\n{text}");
        }
        let (status, body) = admin
            .call(reqwest::Method::GET, "/api/pipelines/copy_seq", None)
            .await;
        assert_eq!(status, 200);
        assert_eq!(body["recent_dead_letters"][0]["reason"], "invalid json");
        assert!(
            body["explain"]
                .as_str()
                .is_some_and(|e| e.contains("copy_seq")),
            "{body}"
        );
        assert!(gateway.shutdown().await);
    });
}
