CREATE SOURCE readings (
    site TEXT NOT NULL, sensor TEXT NOT NULL, ts TIMESTAMP NOT NULL, v DOUBLE,
    WATERMARK FOR ts AS ts - INTERVAL '500' MILLISECOND
) WITH (connector = 'file', path = '${CASE}/input.jsonl', format = 'json', batch_size = 4);

CREATE SINK out WITH (connector = 'file', path = '${OUT}', format = 'json');

CREATE PIPELINE per_site_sensor AS
INSERT INTO out
SELECT site, upper(sensor) AS sensor, window_start, min(v) AS lo, max(v) AS hi, avg(v) AS mean
FROM TUMBLE(readings, ts, INTERVAL '1' SECOND)
GROUP BY site, upper(sensor), window_start;
