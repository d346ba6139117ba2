CREATE SOURCE vibration (
    sensor TEXT NOT NULL,
    ts     TIMESTAMP NOT NULL,
    v      DOUBLE,
    WATERMARK FOR ts AS ts - INTERVAL '1' SECOND
) WITH (connector = 'file', path = '${CASE}/input.jsonl', format = 'json', batch_size = 3);

CREATE SINK out WITH (connector = 'file', path = '${OUT}', format = 'json');

CREATE PIPELINE positive_only AS
INSERT INTO out
SELECT sensor, ts, v, CASE WHEN v > 4 THEN 'high' ELSE 'normal' END AS level, CAST(v AS INT) AS whole
FROM vibration
WHERE v > 0 AND sensor <> 'b';
