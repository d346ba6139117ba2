CREATE SOURCE vibration (
    sensor TEXT NOT NULL,
    ts     TIMESTAMP NOT NULL,
    v      DOUBLE,
    WATERMARK FOR ts AS ts - INTERVAL '1' SECOND
) WITH (connector = 'file', path = '${CASE}/input.jsonl', format = 'json', batch_size = 3);

CREATE SINK out WITH (connector = 'file', path = '${OUT}', format = 'json');

CREATE PIPELINE busy_windows AS
INSERT INTO out
SELECT sensor, window_start, count(*) AS samples, sum(v) AS total
FROM TUMBLE(vibration, ts, INTERVAL '2' SECOND)
GROUP BY sensor, window_start
HAVING count(*) >= 3;
