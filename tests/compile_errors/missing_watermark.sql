CREATE SOURCE raw (sensor TEXT, ts TIMESTAMP, v DOUBLE)
WITH (connector = 'file', path = 'input.jsonl', format = 'json');
CREATE SINK out WITH (connector = 'stdout');
CREATE PIPELINE p AS INSERT INTO out
SELECT sensor, window_start, avg(v)
FROM TUMBLE(raw, ts, INTERVAL '1' SECOND)
GROUP BY sensor, window_start;
