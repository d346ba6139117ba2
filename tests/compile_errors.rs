//! Compile-error golden tests: each `tests/compile_errors/NAME.sql` must fail to compile with
//! exactly the diagnostics in `NAME.expected` (`FILE:LINE:COL: error: ...` and hints).
//! Regenerate after an intended change with `WEIR_BLESS=1 cargo nextest run --test compile_errors`.

use std::path::Path;

#[test]
fn compile_errors_match_their_expected_diagnostics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/compile_errors");
    let mut cases: Vec<_> = std::fs::read_dir(&root)
        .expect("tests/compile_errors exists")
        .map(|e| e.expect("readable").path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 5, "compile-error cases are missing");
    for case in cases {
        let name = case
            .file_name()
            .expect("file name")
            .to_string_lossy()
            .to_string();
        let sql = std::fs::read_to_string(&case).expect("readable sql");
        let error = match weir_planner::compile(&sql) {
            Ok(_) => panic!("{name} compiled but should fail"),
            Err(error) => error,
        };
        let actual = error.render(&name) + "\n";
        for diagnostic in &error.diagnostics {
            assert!(
                diagnostic.position.line >= 1,
                "{name}: diagnostic without a line: {diagnostic}"
            );
        }
        let expected_path = case.with_extension("expected");
        if std::env::var_os("WEIR_BLESS").is_some() {
            std::fs::write(&expected_path, &actual).expect("write expected");
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|_| panic!("{name}: no .expected file; run with WEIR_BLESS=1"));
        assert_eq!(actual, expected, "{name}: diagnostics differ");
    }
}
