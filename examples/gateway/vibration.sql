-- The vibration workload on a live gateway: sensors publish 1 kHz samples over MQTT (in
-- 100-sample blocks), Weir publishes 1-second RMS and peak per sensor and anomaly events
-- back to MQTT. The sensor id comes from the topic. No `url` option: the gateway's broker.
CREATE SOURCE vibration (
    sensor TEXT NOT NULL,
    ts     TIMESTAMP NOT NULL,
    v      DOUBLE,
    WATERMARK FOR ts AS ts - INTERVAL '1' SECOND
) WITH (connector = 'mqtt', topic = 'plant1/{sensor}/vibration', format = 'json', qos = 0);

CREATE SINK rms_topic WITH (connector = 'mqtt', topic = 'plant1/{sensor}/rms');
CREATE SINK alerts_topic WITH (connector = 'mqtt', topic = 'plant1/{sensor}/alerts');

CREATE PIPELINE vibration_rms AS
INSERT INTO rms_topic
SELECT sensor, window_start, window_end,
       round(sqrt(avg(v * v)), 4) AS rms, round(max(abs(v)), 4) AS peak, count(*) AS samples
FROM TUMBLE(vibration, ts, INTERVAL '1' SECOND)
GROUP BY sensor, window_start, window_end;

CREATE PIPELINE vibration_anomalies AS
INSERT INTO alerts_topic
SELECT sensor, ts, v, round(z, 2) AS z
FROM (
    SELECT sensor, ts, v, zscore(v, 500) OVER (PARTITION BY sensor ORDER BY ts) AS z
    FROM vibration
)
WHERE abs(z) > 6;
