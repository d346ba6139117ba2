//! The `mqtt` source and sink against real brokers: the embedded one (rumqttd) and Mosquitto
//! (a broker Weir did not write), each started on a free loopback port by the test.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::task::JoinHandle;
use weir_connectors::mqtt::mosquitto::{self, Mosquitto};
use weir_connectors::mqtt::{EmbeddedBroker, EmbeddedBrokerConfig, MqttStats};
use weir_connectors::{ConnectorSpec, DeadLetterQueue, SourceEvent};

/// A broker for one test; Mosquitto is killed when dropped.
enum TestBroker {
    Embedded(EmbeddedBroker),
    Mosquitto(Mosquitto),
}

impl TestBroker {
    fn url(&self) -> String {
        match self {
            Self::Embedded(broker) => broker.url(),
            Self::Mosquitto(broker) => broker.url(),
        }
    }
}

fn embedded() -> TestBroker {
    let config = EmbeddedBrokerConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        ..EmbeddedBrokerConfig::default()
    };
    TestBroker::Embedded(EmbeddedBroker::start(&config).expect("embedded broker"))
}

fn mosquitto() -> TestBroker {
    assert!(
        mosquitto::binary().is_some(),
        "Mosquitto is not installed: run ./scripts/test.sh, which installs it"
    );
    TestBroker::Mosquitto(Mosquitto::start().expect("mosquitto"))
}

fn vibration_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("sensor", DataType::Utf8, false),
        Field::new("ts", DataType::Timestamp(TimeUnit::Nanosecond, None), false),
        Field::new("v", DataType::Float64, true),
        Field::new("unit", DataType::Utf8, true),
    ]))
}

/// A source drained by a task into a shared list of batches.
struct Running {
    batches: Arc<Mutex<Vec<RecordBatch>>>,
    stats: Arc<MqttStats>,
    task: JoinHandle<()>,
}

impl Running {
    fn start(spec: ConnectorSpec, schema: SchemaRef, dead_letters: DeadLetterQueue) -> Self {
        let stats = MqttStats::named(&spec.name);
        let mut source =
            weir_connectors::build_source(&spec, schema, dead_letters).expect("source");
        let batches = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&batches);
        let task = tokio::spawn(async move {
            while let SourceEvent::Batch(batch) = source.next_event().await.expect("source event") {
                sink.lock().expect("lock").push(batch);
            }
        });
        Self {
            batches,
            stats,
            task,
        }
    }

    fn rows(&self) -> Vec<String> {
        let batches = self.batches.lock().expect("lock");
        let mut rows = render(&batches);
        rows.sort();
        rows
    }

    fn row_count(&self) -> usize {
        let batches = self.batches.lock().expect("lock");
        batches.iter().map(RecordBatch::num_rows).sum()
    }

    async fn subscribed(&self, times: u64) {
        let stats = Arc::clone(&self.stats);
        wait_until("the source to subscribe", move || {
            stats.subscriptions.load(Ordering::Relaxed) >= times
        })
        .await;
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `rows`, sorted as [`Running::rows`] sorts.
fn sorted(rows: &[&str]) -> Vec<String> {
    let mut rows: Vec<String> = rows.iter().map(|r| (*r).to_owned()).collect();
    rows.sort();
    rows
}

/// Each row as `a|b|c`, NULL as `null`, timestamps in Arrow's display form.
fn render(batches: &[RecordBatch]) -> Vec<String> {
    let options = FormatOptions::default().with_null("null");
    let mut rows = Vec::new();
    for batch in batches {
        let formatters: Vec<_> = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options).expect("formatter"))
            .collect();
        for row in 0..batch.num_rows() {
            let cells: Vec<String> = formatters
                .iter()
                .map(|f| f.value(row).to_string())
                .collect();
            rows.push(cells.join("|"));
        }
    }
    rows
}

/// Polls `done` every 10 ms; fails the test after 20 s. A bound on waiting for an outcome,
/// not a measurement: the test asserts what arrived, never how fast.
async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Publishes every message and waits until the broker has acknowledged them all (QoS 1).
async fn publish(url: &str, messages: &[(&str, Vec<u8>)]) {
    let address = url.trim_start_matches("mqtt://");
    let (host, port) = address.rsplit_once(':').expect("host:port");
    let mut options = MqttOptions::new(
        format!("test-pub-{:08x}", rand::random::<u32>()),
        host,
        port.parse().expect("port"),
    );
    options.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut events) = AsyncClient::new(options, messages.len() + 10);
    for (topic, payload) in messages {
        client
            .publish(*topic, QoS::AtLeastOnce, false, payload.clone())
            .await
            .expect("queue publish");
    }
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while acked < messages.len() {
        assert!(Instant::now() < deadline, "broker did not acknowledge");
        match tokio::time::timeout(Duration::from_secs(5), events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(error)) => panic!("publisher: {error}"),
            Err(_) => {}
        }
    }
    let _ = client.disconnect().await;
}

/// `(topic, payload)` of messages received.
type RawMessages = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// Subscribes and collects `(topic, payload)` of every message received.
struct Subscriber {
    messages: Arc<Mutex<Vec<(String, String, bool)>>>,
    /// The same messages with their payloads as bytes.
    raw: RawMessages,
    task: JoinHandle<()>,
}

impl Subscriber {
    async fn start(url: &str, filter: &str) -> Self {
        let address = url.trim_start_matches("mqtt://");
        let (host, port) = address.rsplit_once(':').expect("host:port");
        let options = MqttOptions::new(
            format!("test-sub-{:08x}", rand::random::<u32>()),
            host,
            port.parse().expect("port"),
        );
        let (client, mut events) = AsyncClient::new(options, 10);
        client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        loop {
            match events.poll().await.expect("subscriber connection") {
                Event::Incoming(Packet::SubAck(_)) => break,
                _ => continue,
            }
        }
        let messages = Arc::new(Mutex::new(Vec::new()));
        let raw = Arc::new(Mutex::new(Vec::new()));
        let (sink, raw_sink) = (Arc::clone(&messages), Arc::clone(&raw));
        let task = tokio::spawn(async move {
            let _client = client;
            while let Ok(event) = events.poll().await {
                if let Event::Incoming(Packet::Publish(p)) = event {
                    sink.lock().expect("lock").push((
                        p.topic.clone(),
                        String::from_utf8_lossy(&p.payload).into_owned(),
                        p.retain,
                    ));
                    raw_sink
                        .lock()
                        .expect("lock")
                        .push((p.topic.clone(), p.payload.to_vec()));
                }
            }
        });
        Self {
            messages,
            raw,
            task,
        }
    }

    fn messages(&self) -> Vec<(String, String, bool)> {
        self.messages.lock().expect("lock").clone()
    }

    fn raw(&self) -> Vec<(String, Vec<u8>)> {
        self.raw.lock().expect("lock").clone()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn source_spec(name: &str, url: &str, topic: &str) -> ConnectorSpec {
    ConnectorSpec::new("mqtt")
        .with_name(name)
        .with_option("url", url)
        .with_option("topic", topic)
        .with_option("linger", "5ms")
        .with_event_time("ts")
}

async fn samples_blocks_arrays_and_topic_keys(broker: TestBroker, name: &str) {
    let url = broker.url();
    let running = Running::start(
        source_spec(name, &url, "plant1/{sensor}/vibration"),
        vibration_schema(),
        DeadLetterQueue::default(),
    );
    running.subscribed(1).await;
    // The messages that must not arrive go first: one publisher's QoS 1 messages arrive in
    // order, so once the last expected row is in, nothing misrouted can still come.
    publish(
        &url,
        &[
            ("plant2/s9/vibration", br#"{"ts":1000,"v":9}"#.to_vec()),
            ("plant1/s9/temperature", br#"{"ts":1000,"v":9}"#.to_vec()),
            (
                "plant1/s1/vibration",
                br#"{"ts":1000,"v":1.5,"unit":"g"}"#.to_vec(),
            ),
            (
                "plant1/s2/vibration",
                br#"[{"ts":1000,"v":2.0},{"ts":1001,"v":2.5}]"#.to_vec(),
            ),
            (
                "plant1/s3/vibration",
                br#"{"t0":2000,"rate_hz":1000,"samples":[1,2,3]}"#.to_vec(),
            ),
            // The topic wins over a field of the same name in the payload.
            (
                "plant1/s4/vibration",
                br#"{"sensor":"other","ts":3000,"v":4}"#.to_vec(),
            ),
        ],
    )
    .await;
    wait_until("7 rows", || running.row_count() >= 7).await;
    assert_eq!(
        running.rows(),
        sorted(&[
            "s1|1970-01-01T00:00:01|1.5|g",
            "s2|1970-01-01T00:00:01|2.0|null",
            "s2|1970-01-01T00:00:01.001|2.5|null",
            "s3|1970-01-01T00:00:02|1.0|null",
            "s3|1970-01-01T00:00:02.001|2.0|null",
            "s3|1970-01-01T00:00:02.002|3.0|null",
            "s4|1970-01-01T00:00:03|4.0|null",
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_samples_blocks_arrays_and_topic_keys() {
    samples_blocks_arrays_and_topic_keys(embedded(), "keys-embedded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_samples_blocks_arrays_and_topic_keys() {
    samples_blocks_arrays_and_topic_keys(mosquitto(), "keys-mosquitto").await;
}

async fn malformed_messages_are_dead_lettered_per_reason(broker: TestBroker, name: &str) {
    let url = broker.url();
    let dead_letters = DeadLetterQueue::default();
    let running = Running::start(
        source_spec(name, &url, "m/{sensor}").with_option("max_message_bytes", 200),
        vibration_schema(),
        dead_letters.clone(),
    );
    running.subscribed(1).await;
    let mut too_large = br#"{"ts":1000,"v":1,"unit":""#.to_vec();
    too_large.extend(std::iter::repeat_n(b'x', 300));
    too_large.extend(br#""}"#);
    publish(
        &url,
        &[
            ("m/a", too_large),
            (
                "m/a",
                b"{\"ts\":1000,\"v\":1,\"unit\":\"\xff\xfe\"}".to_vec(),
            ),
            ("m/a", b"{\"ts\":1000,".to_vec()),
            ("m/a", br#"{"ts":1000,"v":"0.5"}"#.to_vec()),
            ("m/a", br#"{"v":1.0}"#.to_vec()),
            ("m/a", br#"{"ts":1000,"v":"NaN"}"#.to_vec()),
            (
                "m/a",
                br#"[{"ts":1000,"v":1},{"v":2},{"ts":1001,"v":3}]"#.to_vec(),
            ),
            ("m/b", br#"{"ts":1002,"v":4}"#.to_vec()),
        ],
    )
    .await;
    wait_until("3 good rows and 7 letters", || {
        running.row_count() >= 3 && dead_letters.count() >= 7
    })
    .await;
    assert_eq!(
        running.rows(),
        sorted(&[
            "a|1970-01-01T00:00:01|1.0|null",
            "a|1970-01-01T00:00:01.001|3.0|null",
            "b|1970-01-01T00:00:01.002|4.0|null",
        ])
    );
    let mut reasons = dead_letters.counts_by_reason();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            ("invalid json".to_owned(), 1),
            ("invalid utf-8".to_owned(), 1),
            ("message too large".to_owned(), 1),
            ("missing field 'ts'".to_owned(), 2),
            ("non-numeric value for 'v'".to_owned(), 1),
            ("wrong type for 'v': expected number".to_owned(), 1),
        ]
    );
    let stats = MqttStats::named(name);
    assert_eq!(stats.messages.load(Ordering::Relaxed), 8);
    assert_eq!(stats.rejected.load(Ordering::Relaxed), 7);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_malformed_messages_are_dead_lettered_per_reason() {
    malformed_messages_are_dead_lettered_per_reason(embedded(), "bad-embedded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_malformed_messages_are_dead_lettered_per_reason() {
    malformed_messages_are_dead_lettered_per_reason(mosquitto(), "bad-mosquitto").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_lines_fill_the_columns_not_taken_from_the_topic() {
    let broker = embedded();
    let url = broker.url();
    let dead_letters = DeadLetterQueue::default();
    let running = Running::start(
        source_spec("csv", &url, "c/{sensor}").with_option("format", "csv"),
        vibration_schema(),
        dead_letters.clone(),
    );
    running.subscribed(1).await;
    publish(
        &url,
        &[("c/s1", b"1000,1.5,g\n1001,2.5,\n\nbad,1,x\n".to_vec())],
    )
    .await;
    wait_until("2 rows", || {
        running.row_count() >= 2 && dead_letters.count() >= 1
    })
    .await;
    assert_eq!(
        running.rows(),
        sorted(&[
            "s1|1970-01-01T00:00:01|1.5|g",
            "s1|1970-01-01T00:00:01.001|2.5|null"
        ])
    );
    assert_eq!(
        dead_letters.counts_by_reason(),
        [("invalid timestamp for 'ts'".to_owned(), 1)]
    );
}

fn result_batch() -> RecordBatch {
    use arrow::array::{Float64Array, StringArray, TimestampNanosecondArray};
    let schema = Arc::new(Schema::new(vec![
        Field::new("sensor", DataType::Utf8, false),
        Field::new(
            "window_end",
            DataType::Timestamp(TimeUnit::Nanosecond, None),
            false,
        ),
        Field::new("rms", DataType::Float64, true),
    ]));
    RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(vec!["s1", "s2", "s1"])),
            Arc::new(TimestampNanosecondArray::from(vec![
                1_000_000_000,
                1_000_000_000,
                2_000_000_000,
            ])),
            Arc::new(Float64Array::from(vec![Some(0.5), None, Some(f64::NAN)])),
        ],
    )
    .expect("batch")
}

async fn sink_publishes_rows_on_templated_topics(broker: TestBroker, name: &str) {
    let url = broker.url();
    let subscriber = Subscriber::start(&url, "results/#").await;
    let batch = result_batch();
    let rows_spec = ConnectorSpec::new("mqtt")
        .with_name(name)
        .with_option("url", url.as_str())
        .with_option("topic", "results/rows/{sensor}");
    let arrays_spec = ConnectorSpec::new("mqtt")
        .with_name(name)
        .with_option("url", url.as_str())
        .with_option("topic", "results/arrays/{sensor}")
        .with_option("mode", "batch")
        .with_option("timestamps", "epoch_ms");
    for spec in [rows_spec, arrays_spec] {
        let mut sink =
            weir_connectors::build_sink(&spec, batch.schema(), &Default::default()).expect("sink");
        sink.write_batch(&batch).expect("write");
        sink.flush().expect("flush");
        // Dropping the sink sends what is queued before disconnecting.
        drop(sink);
    }
    // Compare whatever arrived, so a failure shows what is missing.
    let deadline = Instant::now() + Duration::from_secs(20);
    while subscriber.messages().len() < 5 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut messages = subscriber.messages();
    messages.sort();
    let expected = [
        (
            "results/arrays/s1",
            r#"[{"sensor":"s1","window_end":1000,"rms":0.5},{"sensor":"s1","window_end":2000,"rms":null}]"#,
        ),
        (
            "results/arrays/s2",
            r#"[{"sensor":"s2","window_end":1000,"rms":null}]"#,
        ),
        (
            "results/rows/s1",
            r#"{"sensor":"s1","window_end":"1970-01-01T00:00:01Z","rms":0.5}"#,
        ),
        (
            "results/rows/s1",
            r#"{"sensor":"s1","window_end":"1970-01-01T00:00:02Z","rms":null}"#,
        ),
        (
            "results/rows/s2",
            r#"{"sensor":"s2","window_end":"1970-01-01T00:00:01Z","rms":null}"#,
        ),
    ];
    let got: Vec<(&str, &str)> = messages
        .iter()
        .map(|(t, p, _)| (t.as_str(), p.as_str()))
        .collect();
    assert_eq!(got, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_sink_publishes_rows_on_templated_topics() {
    sink_publishes_rows_on_templated_topics(embedded(), "sink-embedded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sink_publishes_rows_on_templated_topics() {
    sink_publishes_rows_on_templated_topics(mosquitto(), "sink-mosquitto").await;
}

/// A window's results are a burst of small messages: the sink writes them to the socket
/// together instead of one system call (and one TCP segment) per message.
async fn a_batchs_results_leave_together(broker: TestBroker, name: &str) {
    use arrow::array::{Int64Array, StringArray};
    let url = broker.url();
    let subscriber = Subscriber::start(&url, "burst/#").await;
    let rows = 600;
    let schema = Arc::new(Schema::new(vec![
        Field::new("sensor", DataType::Utf8, false),
        Field::new("n", DataType::Int64, false),
    ]));
    let batch = RecordBatch::try_new(
        Arc::clone(&schema),
        vec![
            Arc::new(StringArray::from_iter_values(
                (0..rows).map(|i| format!("s{i}")),
            )),
            Arc::new(Int64Array::from_iter_values(0..rows as i64)),
        ],
    )
    .expect("batch");
    let mut writes = Vec::new();
    for qos in [0, 1] {
        let sink_name = format!("{name}-qos{qos}");
        let spec = ConnectorSpec::new("mqtt")
            .with_name(&sink_name)
            .with_option("url", url.as_str())
            .with_option("topic", format!("burst/{qos}/{{sensor}}"))
            .with_option("qos", qos);
        let mut sink = weir_connectors::build_sink(&spec, Arc::clone(&schema), &Default::default())
            .expect("sink");
        sink.write_batch(&batch).expect("write");
        // Dropping the sink waits until the broker has every message.
        drop(sink);
        writes.push(MqttStats::named(&sink_name).writes.load(Ordering::Relaxed));
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while subscriber.messages().len() < 2 * rows && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut got: Vec<(String, String)> = subscriber
        .messages()
        .into_iter()
        .map(|(topic, payload, _)| (topic, payload))
        .collect();
    got.sort();
    let mut expected: Vec<(String, String)> = [0, 1]
        .into_iter()
        .flat_map(|qos| {
            (0..rows).map(move |i| {
                (
                    format!("burst/{qos}/s{i}"),
                    format!(r#"{{"sensor":"s{i}","n":{i}}}"#),
                )
            })
        })
        .collect();
    expected.sort();
    assert_eq!(got.len(), expected.len(), "every result arrives once");
    assert_eq!(got, expected);
    // QoS 0: one write per chunk of 256 messages.
    assert_eq!(writes[0], 3, "writes at QoS 0");
    // QoS 1: the first 100 (rumqttc's in-flight limit) in one write, then as acks come
    // back: one write per read of acks, so at most one per message after the first 100
    // when a broker acknowledges them one at a time (Mosquitto often does).
    assert!(
        (6..=1 + rows as u64 - 100).contains(&writes[1]),
        "writes at QoS 1: {}",
        writes[1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_a_batchs_results_leave_together() {
    a_batchs_results_leave_together(embedded(), "burst-embedded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_a_batchs_results_leave_together() {
    a_batchs_results_leave_together(mosquitto(), "burst-mosquitto").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_results_reach_late_subscribers() {
    let broker = mosquitto();
    let url = broker.url();
    let spec = ConnectorSpec::new("mqtt")
        .with_name("retain")
        .with_option("url", url.as_str())
        .with_option("topic", "state/{sensor}")
        .with_option("retain", true);
    let batch = result_batch();
    let mut sink =
        weir_connectors::build_sink(&spec, batch.schema(), &Default::default()).expect("sink");
    sink.write_batch(&batch).expect("write");
    drop(sink);
    let subscriber = Subscriber::start(&url, "state/#").await;
    wait_until("2 retained messages", || subscriber.messages().len() >= 2).await;
    let messages = subscriber.messages();
    assert!(
        messages.iter().all(|(_, _, retained)| *retained),
        "{messages:?}"
    );
    let s1 = messages
        .iter()
        .find(|(t, _, _)| t == "state/s1")
        .expect("s1");
    assert!(
        s1.1.contains("1970-01-01T00:00:02Z"),
        "last value per topic: {s1:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_reconnects_and_resubscribes_after_the_broker_restarts() {
    let Some(_) = mosquitto::binary() else {
        panic!("Mosquitto is not installed: run ./scripts/test.sh, which installs it");
    };
    let mut broker = Mosquitto::start().expect("mosquitto");
    let port = broker.address().port();
    let url = broker.url();
    let running = Running::start(
        source_spec("restart", &url, "r/{sensor}").with_option("keep_alive", "2s"),
        vibration_schema(),
        DeadLetterQueue::default(),
    );
    running.subscribed(1).await;
    let batch = |from: i64, to: i64| -> Vec<(&'static str, Vec<u8>)> {
        (from..to)
            .map(|i| ("r/s1", format!(r#"{{"ts":{i},"v":{i}}}"#).into_bytes()))
            .collect()
    };
    publish(&url, &batch(0, 100)).await;
    wait_until("the first 100 rows", || running.row_count() >= 100).await;

    broker.kill();
    let stats = Arc::clone(&running.stats);
    wait_until("the source to notice", || {
        stats.disconnects.load(Ordering::Relaxed) >= 1
    })
    .await;
    let _restarted = Mosquitto::start_on(port).expect("mosquitto again");
    running.subscribed(2).await;
    publish(&url, &batch(100, 200)).await;
    wait_until("all 200 rows", || running.row_count() >= 200).await;
    let mut values: Vec<i64> = running
        .rows()
        .iter()
        .map(|r| {
            let v: f64 = r.split('|').nth(2).expect("v").parse().expect("number");
            v as i64
        })
        .collect();
    values.sort_unstable();
    values.dedup();
    assert_eq!(values, (0..200).collect::<Vec<_>>());
    assert!(running.stats.connects.load(Ordering::Relaxed) >= 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_started_before_its_broker_connects_when_it_comes_up() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let url = format!("mqtt://127.0.0.1:{port}");
    let running = Running::start(
        source_spec("late-broker", &url, "late/{sensor}"),
        vibration_schema(),
        DeadLetterQueue::default(),
    );
    let stats = Arc::clone(&running.stats);
    wait_until("a failed attempt", || {
        stats.connect_failures.load(Ordering::Relaxed) >= 1
    })
    .await;
    let _broker = Mosquitto::start_on(port).expect("mosquitto");
    running.subscribed(1).await;
    publish(&url, &[("late/s1", br#"{"ts":5,"v":5}"#.to_vec())]).await;
    wait_until("the row", || running.row_count() >= 1).await;
    assert_eq!(running.rows(), ["s1|1970-01-01T00:00:00.005|5.0|null"]);
}

#[test]
fn bad_options_are_reported_when_the_sql_is_checked() {
    let schema = vibration_schema();
    let check = |spec: ConnectorSpec| {
        weir_connectors::validate_source(&spec, &schema)
            .map(|()| "ok".to_owned())
            .unwrap_or_else(|e| e.to_string())
    };
    let base = ConnectorSpec::new("mqtt").with_option("topic", "p/{sensor}/v");
    assert_eq!(check(base.clone()), "ok");
    assert!(check(base.clone().with_option("topic", "p/{ts}")).contains("must be TEXT"));
    assert!(check(base.clone().with_option("url", "localhost")).contains("no scheme"));
    assert!(check(base.clone().with_option("clean_session", false)).contains("client_id"));
    assert!(check(base.clone().with_option("format", "xml")).contains("unknown variant `xml`"));
    // TLS files live on the gateway: checking the SQL elsewhere does not read them.
    assert_eq!(
        check(
            base.with_option("url", "mqtts://broker:8883")
                .with_option("ca_file", "/only/on/the/gateway.pem")
        ),
        "ok"
    );
}

fn sparkplug_metric(
    name: Option<&str>,
    alias: u64,
    value: f64,
) -> weir_proto::sparkplug::payload::Metric {
    use weir_proto::sparkplug::DataType;
    use weir_proto::sparkplug::payload::{Metric, metric::Value};
    Metric {
        name: name.map(str::to_owned),
        alias: Some(alias),
        datatype: name.map(|_| DataType::Double as u32),
        value: Some(Value::DoubleValue(value)),
        ..Metric::default()
    }
}

fn sparkplug_payload(
    seq: u64,
    timestamp: u64,
    metrics: Vec<weir_proto::sparkplug::payload::Metric>,
) -> Vec<u8> {
    use prost::Message;
    weir_proto::sparkplug::Payload {
        timestamp: Some(timestamp),
        seq: Some(seq),
        metrics,
        ..weir_proto::sparkplug::Payload::default()
    }
    .encode_to_vec()
}

async fn sparkplug_births_and_aliased_data(broker: TestBroker, name: &str) {
    let url = broker.url();
    let schema = Arc::new(Schema::new(vec![
        Field::new("node", DataType::Utf8, true),
        Field::new("device", DataType::Utf8, true),
        Field::new("metric", DataType::Utf8, false),
        Field::new("ts", DataType::Timestamp(TimeUnit::Nanosecond, None), false),
        Field::new("value", DataType::Float64, true),
    ]));
    let dead_letters = DeadLetterQueue::default();
    let running = Running::start(
        source_spec(name, &url, "spBv1.0/plant1/#").with_option("format", "sparkplug"),
        schema,
        dead_letters.clone(),
    );
    running.subscribed(1).await;
    let commands = Subscriber::start(&url, "spBv1.0/plant1/NCMD/#").await;
    // Data before any birth: its alias means nothing yet, and the node is asked for a rebirth,
    // as a Sparkplug host application would.
    publish(
        &url,
        &[(
            "spBv1.0/plant1/NDATA/edge1",
            sparkplug_payload(5, 1_000, vec![sparkplug_metric(None, 1, 9.0)]),
        )],
    )
    .await;
    wait_until("a rebirth request", || !commands.raw().is_empty()).await;
    let (topic, payload) = commands.raw().remove(0);
    assert_eq!(topic, "spBv1.0/plant1/NCMD/edge1");
    let request = <weir_proto::sparkplug::Payload as prost::Message>::decode(payload.as_slice())
        .expect("an NCMD is a Sparkplug payload");
    let metric = &request.metrics[0];
    assert_eq!(metric.name.as_deref(), Some("Node Control/Rebirth"));
    assert_eq!(
        metric.value,
        Some(weir_proto::sparkplug::payload::metric::Value::BooleanValue(
            true
        ))
    );
    publish(
        &url,
        &[
            (
                "spBv1.0/plant1/NBIRTH/edge1",
                sparkplug_payload(
                    0,
                    1_000,
                    vec![sparkplug_metric(Some("temperature"), 1, 21.5)],
                ),
            ),
            (
                "spBv1.0/plant1/DBIRTH/edge1/pump1",
                sparkplug_payload(1, 1_000, vec![sparkplug_metric(Some("pressure"), 10, 2.5)]),
            ),
            (
                "spBv1.0/plant1/NDATA/edge1",
                sparkplug_payload(2, 2_000, vec![sparkplug_metric(None, 1, 22.0)]),
            ),
            (
                "spBv1.0/plant1/DDATA/edge1/pump1",
                sparkplug_payload(3, 2_000, vec![sparkplug_metric(None, 10, 2.75)]),
            ),
            (
                "spBv1.0/plant1/NDATA/edge1",
                b"not protobuf at all".to_vec(),
            ),
        ],
    )
    .await;
    wait_until("4 rows and 2 letters", || {
        running.row_count() >= 4 && dead_letters.count() >= 2
    })
    .await;
    assert_eq!(
        running.rows(),
        sorted(&[
            "edge1|null|temperature|1970-01-01T00:00:01|21.5",
            "edge1|pump1|pressure|1970-01-01T00:00:01|2.5",
            "edge1|null|temperature|1970-01-01T00:00:02|22.0",
            "edge1|pump1|pressure|1970-01-01T00:00:02|2.75",
        ])
    );
    let mut reasons = dead_letters.counts_by_reason();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            ("invalid sparkplug payload".to_owned(), 1),
            (
                "sparkplug metric alias without a birth certificate".to_owned(),
                1
            ),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_sparkplug_births_and_aliased_data() {
    sparkplug_births_and_aliased_data(embedded(), "sparkplug-embedded").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_sparkplug_births_and_aliased_data() {
    sparkplug_births_and_aliased_data(mosquitto(), "sparkplug-mosquitto").await;
}

/// Runs a command and fails the test with its output if it fails.
fn sh(program: &str, args: &[&str], dir: &std::path::Path) {
    let output = std::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A certificate authority and a server certificate for 127.0.0.1, made with openssl.
fn make_certificates(dir: &std::path::Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=Weir Test CA",
    ]);
    sh("openssl", &ca, dir);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    sh("openssl", &csr, dir);
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n").expect("ext");
    sh(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
        dir,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_broker_with_a_login_over_tls() {
    assert!(
        mosquitto::binary().is_some(),
        "Mosquitto is not installed: run ./scripts/test.sh, which installs it"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    make_certificates(dir.path());
    sh(
        "mosquitto_passwd",
        &["-c", "-b", "passwords", "gateway", "s3cret"],
        dir.path(),
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    // Mosquitto started as root drops to its own user, which must be able to read these.
    {
        use std::os::unix::fs::PermissionsExt;
        let readable = |p: &std::path::Path, mode| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).expect("chmod")
        };
        readable(dir.path(), 0o755);
        for file in ["passwords", "server.pem", "server.key"] {
            readable(&dir.path().join(file), 0o644);
        }
    }
    let path = |name: &str| dir.path().join(name).display().to_string();
    let _broker = Mosquitto::start_with(
        port,
        &format!(
            "allow_anonymous false\npassword_file {}\ncertfile {}\nkeyfile {}\n",
            path("passwords"),
            path("server.pem"),
            path("server.key")
        ),
    )
    .expect("mosquitto with TLS");
    let url = format!("mqtts://127.0.0.1:{port}");
    let login = |spec: ConnectorSpec, password: &str| {
        spec.with_option("url", url.as_str())
            .with_option("ca_file", path("ca.pem"))
            .with_option("username", "gateway")
            .with_option("password", password)
    };

    // A wrong password is refused, counted, retried; never a subscription.
    let source = |name: &str| {
        ConnectorSpec::new("mqtt")
            .with_name(name)
            .with_option("topic", "secure/{sensor}")
            .with_option("linger", "5ms")
    };
    let schema = result_batch().schema();
    let refused = Running::start(
        login(source("tls-wrong"), "guess"),
        Arc::clone(&schema),
        DeadLetterQueue::default(),
    );
    let stats = Arc::clone(&refused.stats);
    wait_until("two refused attempts", || {
        stats.connect_failures.load(Ordering::Relaxed) >= 2
    })
    .await;
    assert_eq!(refused.stats.subscriptions.load(Ordering::Relaxed), 0);

    // The right login: the sink publishes over TLS, the source reads over TLS.
    let running = Running::start(
        login(source("tls-right"), "s3cret"),
        schema,
        DeadLetterQueue::default(),
    );
    running.subscribed(1).await;
    let batch = result_batch();
    let sink_spec = login(
        ConnectorSpec::new("mqtt")
            .with_name("tls-sink")
            .with_option("topic", "secure/{sensor}")
            .with_option("timestamps", "epoch_ms"),
        "s3cret",
    );
    let mut sink =
        weir_connectors::build_sink(&sink_spec, batch.schema(), &Default::default()).expect("sink");
    sink.write_batch(&batch).expect("write");
    drop(sink);
    wait_until("3 rows over TLS", || running.row_count() >= 3).await;
    // NaN has no JSON form: the sink writes null.
    assert_eq!(
        running.rows(),
        sorted(&[
            "s1|1970-01-01T00:00:01|0.5",
            "s1|1970-01-01T00:00:02|null",
            "s2|1970-01-01T00:00:01|null",
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_broker_can_require_a_login() {
    let config = EmbeddedBrokerConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        users: [("sensor".to_owned(), "pa55".to_owned())].into(),
        ..EmbeddedBrokerConfig::default()
    };
    let broker = EmbeddedBroker::start(&config).expect("embedded broker");
    let url = broker.url();
    let anonymous = Running::start(
        source_spec("anonymous", &url, "login/{sensor}"),
        vibration_schema(),
        DeadLetterQueue::default(),
    );
    let stats = Arc::clone(&anonymous.stats);
    wait_until("refused attempts", || {
        stats.connect_failures.load(Ordering::Relaxed) >= 2
    })
    .await;
    assert_eq!(anonymous.stats.subscriptions.load(Ordering::Relaxed), 0);
    let logged_in = Running::start(
        source_spec("logged-in", &url, "login/{sensor}")
            .with_option("username", "sensor")
            .with_option("password", "pa55"),
        vibration_schema(),
        DeadLetterQueue::default(),
    );
    logged_in.subscribed(1).await;
}

async fn a_persistent_session_receives_what_was_published_while_away(
    broker: TestBroker,
    name: &str,
) {
    let url = broker.url();
    let spec = source_spec(name, &url, "held/{sensor}")
        .with_option("clean_session", false)
        .with_option("client_id", format!("weir-test-{name}"));
    let first = Running::start(spec.clone(), vibration_schema(), DeadLetterQueue::default());
    first.subscribed(1).await;
    publish(&url, &[("held/s1", br#"{"ts":1,"v":1}"#.to_vec())]).await;
    wait_until("the first row", || first.row_count() >= 1).await;
    let stats = Arc::clone(&first.stats);
    drop(first);
    wait_until("the source to be gone", || {
        stats.up.load(Ordering::Relaxed) == 0
    })
    .await;
    // While no one is connected, the broker keeps QoS 1 messages for the session.
    let away: Vec<(&str, Vec<u8>)> = (2..=2000)
        .map(|i| ("held/s1", format!(r#"{{"ts":{i},"v":{i}}}"#).into_bytes()))
        .collect();
    publish(&url, &away).await;
    let second = Running::start(spec, vibration_schema(), DeadLetterQueue::default());
    wait_until("the 1999 held rows", || second.row_count() >= 1999).await;
    // The backlog comes as a stream: the source hands what each read of the socket brought
    // to the decoder together, not message by message (here about 100-170 a read).
    let reads = second.stats.reads.load(Ordering::Relaxed);
    assert!(
        (1..=1999 / 4).contains(&reads),
        "1999 messages in {reads} reads"
    );
    let mut values: Vec<i64> = second
        .rows()
        .iter()
        .map(|r| {
            r.split('|')
                .nth(2)
                .expect("v")
                .parse::<f64>()
                .expect("number") as i64
        })
        .collect();
    values.sort_unstable();
    values.dedup();
    assert_eq!(values, (2..=2000).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mosquitto_persistent_session_receives_what_was_published_while_away() {
    a_persistent_session_receives_what_was_published_while_away(mosquitto(), "held-mosquitto")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_persistent_session_receives_what_was_published_while_away() {
    a_persistent_session_receives_what_was_published_while_away(embedded(), "held-embedded").await;
}
