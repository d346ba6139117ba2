CREATE SOURCE vibration (
    sensor TEXT NOT NULL,
    ts     TIMESTAMP NOT NULL,
    v      DOUBLE,
    WATERMARK FOR ts AS ts - INTERVAL '1' SECOND
) WITH (connector = 'file', path = '${CASE}/input.jsonl', format = 'json', batch_size = 3);

CREATE SINK out WITH (connector = 'file', path = '${OUT}', format = 'json');

CREATE PIPELINE statistics AS
INSERT INTO out
SELECT sensor, window_start,
       round(stddev(v), 6) AS sd, round(var(v), 6) AS variance,
       round(stddev_pop(v), 6) AS sd_pop,
       first_value(v) AS first_v, last_value(v) AS last_v,
       approx_percentile_cont(0.5) WITHIN GROUP (ORDER BY v) AS median
FROM TUMBLE(vibration, ts, INTERVAL '3' SECOND)
GROUP BY sensor, window_start;
