CREATE SOURCE vibration (
    sensor TEXT NOT NULL,
    ts     TIMESTAMP NOT NULL,
    v      DOUBLE,
    WATERMARK FOR ts AS ts - INTERVAL '1' SECOND
) WITH (connector = 'file', path = '${CASE}/input.jsonl', format = 'json', batch_size = 3);

CREATE SINK out WITH (connector = 'file', path = '${OUT}', format = 'json');

-- Each input line is a block of samples at rate_hz from t0: one row per sample.
CREATE PIPELINE block_rms AS
INSERT INTO out
SELECT sensor, window_start, sqrt(avg(v * v)) AS rms, count(*) AS samples
FROM TUMBLE(vibration, ts, INTERVAL '1' SECOND)
GROUP BY sensor, window_start;
