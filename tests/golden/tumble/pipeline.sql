CREATE SOURCE vibration (
    sensor TEXT NOT NULL,
    ts     TIMESTAMP NOT NULL,
    v      DOUBLE,
    WATERMARK FOR ts AS ts - INTERVAL '1' SECOND
) WITH (connector = 'file', path = '${CASE}/input.jsonl', format = 'json', batch_size = 3);

CREATE SINK out WITH (connector = 'file', path = '${OUT}', format = 'json');

-- 1-second RMS and peak per sensor: the vibration workload.
CREATE PIPELINE vibration_rms AS
INSERT INTO out
SELECT sensor, window_start, window_end,
       sqrt(avg(v * v)) AS rms, max(abs(v)) AS peak, count(*) AS samples
FROM TUMBLE(vibration, ts, INTERVAL '1' SECOND)
GROUP BY sensor, window_start, window_end;
