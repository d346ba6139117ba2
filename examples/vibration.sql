-- The vibration workload: 1 kHz samples from simulated sensors become 1-second RMS and peak
-- per sensor, plus anomaly events when a sample leaves its recent range.
CREATE SOURCE vibration (
    sensor TEXT NOT NULL,
    ts     TIMESTAMP NOT NULL,
    v      DOUBLE,
    WATERMARK FOR ts AS ts - INTERVAL '2' SECOND
) WITH (connector = 'simulator', sensors = 10, rate_hz = 1000, block_size = 100,
        duration_s = 10, seed = 7, faults = true);

CREATE SINK rms_out WITH (connector = 'stdout', format = 'json');
CREATE SINK anomalies_out WITH (connector = 'file', path = 'anomalies.jsonl', format = 'json');

CREATE PIPELINE vibration_rms AS
INSERT INTO rms_out
SELECT sensor, window_start, window_end,
       round(sqrt(avg(v * v)), 4) AS rms, round(max(abs(v)), 4) AS peak, count(*) AS samples
FROM TUMBLE(vibration, ts, INTERVAL '1' SECOND)
GROUP BY sensor, window_start, window_end;

CREATE PIPELINE vibration_anomalies AS
INSERT INTO anomalies_out
SELECT sensor, ts, v, round(z, 2) AS z
FROM (
    SELECT sensor, ts, v, zscore(v, 500) OVER (PARTITION BY sensor ORDER BY ts) AS z
    FROM vibration
)
WHERE abs(z) > 6;
