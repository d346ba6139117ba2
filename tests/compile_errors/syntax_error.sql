CREATE SOURCE vibration (
    sensor TEXT NOT NULL,
    ts     TIMESTAMP NOT NULL,
    v      DOUBLE,
    WATERMARK FOR ts AS ts - INTERVAL '2' SECOND
) WITH (connector = 'file', path = 'input.jsonl', format = 'json');
CREATE SINK out WITH (connector = 'stdout');
CREATE PIPELINE p AS INSERT INTO out
SELECT sensor FROM vibration WHERE v >;
