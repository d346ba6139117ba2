CREATE SOURCE vibration (
    sensor TEXT NOT NULL,
    ts     TIMESTAMP NOT NULL,
    v      DOUBLE,
    WATERMARK FOR ts AS ts - INTERVAL '1' SECOND
) WITH (connector = 'file', path = '${CASE}/input.jsonl', format = 'json', batch_size = 3);

CREATE SINK out WITH (connector = 'file', path = '${OUT}', format = 'json');

-- Flag samples more than 3 standard deviations from the previous 10 of the same sensor.
CREATE PIPELINE spikes AS
INSERT INTO out
SELECT sensor, ts, v, z
FROM (
    SELECT sensor, ts, v, zscore(v, 10) OVER (PARTITION BY sensor ORDER BY ts) AS z
    FROM vibration
)
WHERE abs(z) > 3;
