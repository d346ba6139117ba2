CREATE SOURCE vibration (
    sensor TEXT NOT NULL,
    ts     TIMESTAMP NOT NULL,
    v      DOUBLE,
    WATERMARK FOR ts AS ts - INTERVAL '2' SECOND
) WITH (connector = 'file', path = 'input.jsonl', format = 'json');
CREATE SINK out WITH (connector = 'stdout');
CREATE PIPELINE first AS INSERT INTO out
SELECT sensor, max(v) FROM vibration GROUP BY sensor;

CREATE PIPELINE second AS INSERT INTO outt
SELECT sensor FROM vibration;

CREATE PIPELINE third AS INSERT INTO out
SELECT sensor, vv FROM vibration;
