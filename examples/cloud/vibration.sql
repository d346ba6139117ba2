-- Vibration results for the cloud: 1-second RMS and peak per sensor, and anomaly events,
-- through the gateway's durable uplink. Deploy with
--   weir deploy examples/cloud/vibration.sql --selector site=plant1
-- and read them back with
--   weir query "SELECT * FROM vibration_rms ORDER BY window_start DESC LIMIT 10"
-- The simulator stands in for sensors; with real ones, use the MQTT source of
-- examples/gateway/vibration.sql.
CREATE SOURCE vibration (
    sensor TEXT NOT NULL,
    ts     TIMESTAMP NOT NULL,
    v      DOUBLE,
    WATERMARK FOR ts AS ts - INTERVAL '0.2' SECOND
) WITH (connector = 'simulator', sensors = 20, rate_hz = 1000, realtime = true);

-- Bulk telemetry: a long outage may cost the oldest of it, never the alerts.
CREATE SINK vibration_rms WITH (connector = 'cloud', priority = 'bulk',
    max_bytes = '256MiB', max_age = '7d', overflow = 'drop_oldest');
CREATE SINK vibration_alerts WITH (connector = 'cloud', priority = 'alert',
    max_bytes = '64MiB', overflow = 'drop_newest');

CREATE PIPELINE vibration_rms AS
INSERT INTO vibration_rms
SELECT sensor, window_start, window_end,
       sqrt(avg(v * v)) AS rms, max(abs(v)) AS peak, count(*) AS samples
FROM TUMBLE(vibration, ts, INTERVAL '1' SECOND)
GROUP BY sensor, window_start, window_end;

CREATE PIPELINE vibration_anomalies AS
INSERT INTO vibration_alerts
SELECT sensor, ts, v, round(z, 2) AS z
FROM (
    SELECT sensor, ts, v, zscore(v, 500) OVER (PARTITION BY sensor ORDER BY ts) AS z
    FROM vibration
)
WHERE abs(z) > 6;
