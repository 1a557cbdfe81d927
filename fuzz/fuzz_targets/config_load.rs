//! Config loader: any text gives a typed config or an error naming the file and, for syntax and
//! type errors, a 1-based line and column inside the text; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tollgate::config::{from_str, ConfigError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    // Lines as YAML counts them: LF, CR and CRLF each end one.
    let lines = text.replace("\r\n", "\n").split(['\n', '\r']).count();
    match from_str("fuzz.yaml", text) {
        Ok(_) => {}
        Err(e) => {
            let shown = e.to_string();
            assert!(shown.starts_with("fuzz.yaml"), "error does not name the file: {shown}");
            match e {
                ConfigError::Parse { line, column, .. } => {
                    assert!(line >= 1 && column >= 1, "position {line}:{column} is not 1-based");
                    assert!(line <= lines + 1, "line {line} past the text's {lines} lines");
                }
                ConfigError::Invalid { position: Some((line, column)), field, .. } => {
                    assert!(line >= 1 && column >= 1, "position {line}:{column} is not 1-based");
                    assert!(line <= lines + 1, "line {line} past the text's {lines} lines");
                    assert!(!field.is_empty(), "an invalid value without a field path");
                }
                ConfigError::Invalid { position: None, field, .. } => {
                    assert!(!field.is_empty(), "an invalid value without a field path");
                }
                ConfigError::Read { .. } => panic!("from_str read a file"),
            }
        }
    }
});
